"""Text generation shaped like mlx-lm's API — `load`, `generate`, `stream_generate`, `batch_generate` —
over the engine (engine/engine.py).

A prompt is raw text (encoded with special tokens allowed, as mlx-lm does) or token ids, e.g. from
`ossq.harmony.Chat`. Unless an engine is passed, calls on one model share one engine, so a prompt that
repeats an earlier one (the next turn of a chat) computes only what is new: the prefix cache keeps the
rest. Generation stops on `stop_tokens(config)`, never on `<|end|>`, which only closes a message
inside an answer (formats.md §6.4). `draft_model` (a loaded model with the same vocabulary, or "ngram")
and `num_draft_tokens` turn on speculative decoding as mlx-lm's parameters do (engine/speculative.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ossq.config import ModelConfig
from ossq.device import MemoryMeter
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.load import load_model
from ossq.engine.model import GptOss
from ossq.engine.ops import Ops
from ossq.engine.parallel import SINGLE, Parallel
from ossq.engine.sampling import SamplingParams
from ossq.engine.speculative import DEFAULT_NUM_DRAFT_TOKENS, SpeculativeConfig, speculative_engine
from ossq.errors import InvalidArgument
from ossq.harmony import STOP_TOKENS
from ossq.tokenizer import Tokenizer

_ENGINES: weakref.WeakKeyDictionary[GptOss, Engine] = weakref.WeakKeyDictionary()
_SPECS: weakref.WeakKeyDictionary[GptOss, SpeculativeConfig | None] = weakref.WeakKeyDictionary()


def stop_tokens(config: ModelConfig) -> frozenset[int]:
    """What ends a completion: the config's `eos_token_id` (for the published models <|return|>,
    <|endoftext|> and <|call|>) and harmony's <|return|> and <|call|>."""
    return frozenset(config.eos_token_id) | frozenset(STOP_TOKENS)


@dataclass(frozen=True)
class GenerationStats:
    """Running figures of one generation, in mlx-lm's terms. Times in seconds, memory in GB (1e9 bytes).
    `prompt_tps` counts the prompt tokens computed: `cached_tokens` came from the prefix cache.
    `peak_memory_gb` is read at the first and the last token of a stream, not at every one. With
    speculative decoding, `acceptance_rate` is the fraction of draft tokens accepted and
    `mean_accepted_length` the draft tokens accepted per verification step (engine/speculative.py)."""

    prompt_tokens: int
    cached_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float
    peak_memory_gb: float
    kv_cache_tokens: int
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # new text since the previous response ("" while a multi-byte character is incomplete)
    token: int
    stats: GenerationStats
    finish_reason: str | None  # None while running, then "stop" or "length"


def load(
    path_or_repo: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    ops: Ops | str | None = None,
    parallel: Parallel = SINGLE,
) -> tuple[GptOss, Tokenizer]:
    """The model (this rank's shard under `parallel`, engine/parallel.py) and its tokenizer."""
    model, root = load_model(path_or_repo, device=device, dtype=dtype, ops=ops, parallel=parallel)
    return model, Tokenizer.from_dir(root)


def engine_for(model: GptOss, config: EngineConfig | None = None, spec: SpeculativeConfig | None = None) -> Engine:
    """The engine the model's generate calls share; made anew when `config` or `spec` differs from its own."""
    config = config or EngineConfig()
    engine = _ENGINES.get(model)
    if engine is None or engine.config != config or _SPECS.get(model) != spec:
        _ENGINES.pop(model, None)  # free the old pool before allocating the new one
        del engine
        engine = _ENGINES[model] = Engine(model, config) if spec is None else speculative_engine(model, config, spec)
        _SPECS[model] = spec
    return engine


def speculation(draft_model: GptOss | str | None, num_draft_tokens: int) -> SpeculativeConfig | None:
    """mlx-lm's two parameters as a SpeculativeConfig (None: no draft model, no speculation)."""
    return None if draft_model is None else SpeculativeConfig(draft_model, num_draft_tokens)


def stream_generate(
    model: GptOss,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_tokens: Sequence[int] | None = None,
    max_kv_size: int | None = None,
    engine: Engine | None = None,
    draft_model: GptOss | str | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token, the last one with a finish_reason. Closing the iterator
    early aborts the request. A given `engine` brings its own speculation: then `draft_model` must be None."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine = _engine(model, engine, EngineConfig(max_kv_size=max_kv_size), draft_model, num_draft_tokens)
    stops = _stops(model, stop_tokens)
    meter = MemoryMeter(model.device)
    rid = engine.add_request(ids, sampling, max_tokens=max_tokens, stop=stops)
    detok, peak = tokenizer.detokenizer(), None
    try:
        for out in engine.stream(rid):
            if out.token is None:  # a prefill chunk that did not reach the end of the prompt
                continue
            if peak is None or out.finish_reason:  # not per token: on CPU the probe reads /proc
                peak = meter.peak_gb()
            stats = request_stats(engine, rid, peak)
            text = "" if out.token in stops else detok.add(out.token)
            if out.finish_reason:
                text += detok.flush()
            yield GenerationResponse(text, out.token, stats, out.finish_reason)
    finally:
        engine.abort(rid)
        engine.release(rid)


def _engine(
    model: GptOss,
    engine: Engine | None,
    config: EngineConfig,
    draft_model: GptOss | str | None,
    num_draft_tokens: int,
) -> Engine:
    spec = speculation(draft_model, num_draft_tokens)
    if engine is None:
        return engine_for(model, config, spec)
    if spec is not None:
        raise InvalidArgument("draft_model", "pass draft_model or an engine, not both (speculative_engine makes one)")
    return engine


def _stops(model: GptOss, given: Sequence[int] | None) -> frozenset[int]:
    return stop_tokens(model.config) if given is None else frozenset(given)


def request_stats(engine: Engine, rid: int, peak_memory_gb: float) -> GenerationStats:
    req, times = engine.request(rid), engine.stats.times[rid]
    n = len(req.output)
    ttft = times.first_token - times.added
    decode = times.last_token - times.first_token
    spec = engine.speculator.request_stats(rid) if engine.speculator is not None else None
    return GenerationStats(
        prompt_tokens=req.prompt_len,
        cached_tokens=req.cached_tokens,
        prompt_tps=(req.prompt_len - req.cached_tokens) / ttft,
        generation_tokens=n,
        generation_tps=(n - 1) / decode if n > 1 and decode > 0 else 0.0,
        ttft=ttft,
        peak_memory_gb=peak_memory_gb,
        kv_cache_tokens=engine.kv_cache_tokens,
        acceptance_rate=spec.acceptance_rate if spec else None,
        mean_accepted_length=spec.mean_accepted_length if spec else None,
    )


def generate(
    model: GptOss,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole completion as text (stop token excluded); with `verbose`, stream it and print stats."""
    pieces = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print(format_stats(response.stats))
    return "".join(pieces)


@dataclass(frozen=True)
class BatchResponse:
    """`batch_generate`'s result, in the order of the prompts."""

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: list[GenerationStats]


def batch_generate(
    model: GptOss,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int | Sequence[int] = 256,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_tokens: Sequence[int] | None = None,
    engine: Engine | None = None,
    on_finish=None,
    draft_model: GptOss | str | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
) -> BatchResponse:
    """Run every prompt concurrently (continuous batching) → texts in prompt order. `max_tokens` and
    `sampling` are one for all or one per prompt; `on_finish(i)` is called as prompt i completes.
    With `draft_model`, every request speculates on its own (engine/speculative.py)."""
    n = len(prompts)
    per_max = list(max_tokens) if isinstance(max_tokens, Sequence) else [max_tokens] * n
    per_params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * n
    engine = _engine(model, engine, EngineConfig(), draft_model, num_draft_tokens)
    stops, meter = _stops(model, stop_tokens), MemoryMeter(model.device)
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    rids = [
        engine.add_request(p, s, max_tokens=m, stop=stops) for p, s, m in zip(ids, per_params, per_max, strict=True)
    ]
    index, done = {rid: i for i, rid in enumerate(rids)}, {}
    try:
        while len(done) < n:
            for out in engine.step():
                if out.finish_reason and out.request_id in index:
                    done[out.request_id] = request_stats(engine, out.request_id, meter.peak_gb())
                    if on_finish:
                        on_finish(index[out.request_id])
        tokens = [[t for t in engine.request(r).output if t not in stops] for r in rids]
        reasons = [engine.request(r).finish_reason for r in rids]
    finally:
        for r in rids:
            engine.abort(r)
            engine.release(r)
    texts = [tokenizer.decode(t) for t in tokens]
    return BatchResponse(texts, tokens, reasons, [done[r] for r in rids])


def format_stats(s: GenerationStats) -> str:
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    return (
        f"prompt: {s.prompt_tokens} tokens{cached}, {s.prompt_tps:.1f} tok/s | generation: {s.generation_tokens} "
        f"tokens, {s.generation_tps:.1f} tok/s | ttft {s.ttft * 1000:.0f} ms | peak memory "
        f"{s.peak_memory_gb:.2f} GB | KV cache {s.kv_cache_tokens:,} tokens"
    ) + _format_speculation(s)


def _format_speculation(s: GenerationStats) -> str:
    if s.acceptance_rate is None:
        return ""
    return f" | draft acceptance {s.acceptance_rate:.0%}, {s.mean_accepted_length:.2f} accepted per step"
