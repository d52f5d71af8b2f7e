"""The errors ossq raises at its boundaries.

Every error names what was wrong (file, tensor, field) and, where there is one, the remedy. The CLI
prints `str(error)` on one line and exits non-zero; the server maps them to 4xx bodies.
"""


class OssqError(Exception):
    """Base class: an expected failure caused by the user's input, reported without a traceback."""


class ConfigError(OssqError):
    """A config.json (or a preset override) that ossq cannot run: wrong architecture, bad field."""


class CheckpointError(OssqError):
    """A checkpoint that is missing, truncated, or whose tensors do not match the model."""


class TokenizerError(OssqError):
    """A tokenizer file that cannot be read, or the offline vocabulary failing its checksum."""


class UnsupportedQuantization(OssqError):
    """Bits, group size or mode that the MLX format (and so ossq) does not define."""


class PromptTooLong(OssqError):
    """A prompt that does not fit in the context the cache was sized for."""


class InvalidArgument(OssqError, ValueError):
    """A parameter outside its domain. `name` is the Python parameter (e.g. "temperature"), so the CLI
    can name its own flag (--temp) and the server the request field instead."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class DeviceError(OssqError):
    """A device that this machine (or this build of torch) does not have, e.g. `cuda` on a CPU-only torch."""
