"""ossq: gpt-oss from the published checkpoint to fast local inference at any bit budget."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy re-exports keep `import ossq` (and so `ossq --help`) free of the torch import cost.
    if name in ("load", "generate", "stream_generate", "batch_generate"):
        from ossq.engine import generate as _generate

        return getattr(_generate, name)
    raise AttributeError(name)
