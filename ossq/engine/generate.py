"""Text generation shaped like mlx-lm's API: `load`, `generate`, `stream_generate`.

`Generator` owns one sequence's cache: chunked prefill (PREFILL_CHUNK_TOKENS at a time, so activation
memory is bounded whatever the prompt length), then one token per step. A prompt is either raw text
(encoded with special tokens allowed, as mlx-lm does) or token ids, e.g. from `ossq.harmony.Chat`.
Generation stops on `<|return|>`, `<|call|>` or `<|endoftext|>` — never on `<|end|>`, which only closes
a message inside an answer (formats.md §6.4).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ossq.engine.cache import PREFILL_CHUNK_TOKENS, KVCache
from ossq.engine.load import load_model
from ossq.engine.model import GptOss
from ossq.engine.sampling import Sampler, SamplingParams
from ossq.errors import PromptTooLong
from ossq.harmony import STOP_TOKENS
from ossq.tokenizer import Tokenizer

ENDOFTEXT = 199999
DEFAULT_STOP_TOKENS = (*STOP_TOKENS, ENDOFTEXT)


@dataclass(frozen=True)
class GenerationStats:
    """Running figures of one generation, in mlx-lm's terms. Times in seconds, memory in GB (1e9 bytes)."""

    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float
    peak_memory_gb: float


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # new text since the previous response ("" while a multi-byte character is incomplete)
    token: int
    stats: GenerationStats
    finish_reason: str | None  # None while running, then "stop" or "length"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


class Generator:
    """One sequence: prefill a prompt, then decode token by token."""

    def __init__(
        self, model: GptOss, *, max_tokens: int, max_kv_size: int | None = None, chunk: int = PREFILL_CHUNK_TOKENS
    ) -> None:
        self.model = model
        limit = model.config.max_position_embeddings
        if max_kv_size is None and max_tokens > limit:
            raise PromptTooLong(
                f"{max_tokens} tokens exceed the model's context of {limit} "
                "(shorten the prompt or max_tokens, or pass max_kv_size)"
            )
        self.cache: KVCache = model.make_cache(max_tokens=max_tokens, max_kv_size=max_kv_size, chunk=chunk)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run the prompt through the model; return the last position's logits (1, V)."""
        ids = torch.tensor([list(tokens)], device=self.cache.layers[0].k.device)
        for start in range(0, ids.shape[1], self.cache.chunk):
            logits = self.model(ids[:, start : start + self.cache.chunk], self.cache, last_only=True)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (1,) and return the next logits (1, V)."""
        return self.model(token.view(1, 1), self.cache)[:, -1]


def load(
    path_or_repo: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None
) -> tuple[GptOss, Tokenizer]:
    model, root = load_model(path_or_repo, device=device, dtype=dtype)
    return model, Tokenizer.from_dir(root)


def stream_generate(
    model: GptOss,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_tokens: Sequence[int] = DEFAULT_STOP_TOKENS,
    max_kv_size: int | None = None,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token, the last one with a finish_reason."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    device = model.lm_head.weight.device
    gen = Generator(model, max_tokens=len(ids) + max_tokens, max_kv_size=max_kv_size)
    params = sampling or SamplingParams()
    sampler = Sampler(params, device)
    penalize = params.repetition_penalty != 1 and params.repetition_context > 0
    history = torch.tensor(ids[-params.repetition_context :], device=device)[None] if penalize else None
    detok = tokenizer.detokenizer()
    stops = set(stop_tokens)
    start = time.perf_counter()
    logits = gen.prefill(ids)
    first = None
    for n in range(1, max_tokens + 1):
        token = sampler(logits, history)
        token_id = int(token)  # the one host sync per step: we must print and check stops
        now = time.perf_counter()
        first = first or now
        stats = GenerationStats(
            prompt_tokens=len(ids),
            prompt_tps=len(ids) / (first - start),
            generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            ttft=first - start,
            peak_memory_gb=peak_memory_gb(device),
        )
        done = "stop" if token_id in stops else "length" if n == max_tokens else None
        text = "" if token_id in stops else detok.add(token_id)
        if done:
            text += detok.flush()
        yield GenerationResponse(text, token_id, stats, done)
        if done:
            return
        if penalize:
            history = torch.cat([history, token[None]], dim=1)[:, -params.repetition_context :]
        logits = gen.step(token)


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


def format_stats(s: GenerationStats) -> str:
    return (
        f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | generation: {s.generation_tokens} "
        f"tokens, {s.generation_tps:.1f} tok/s | ttft {s.ttft * 1000:.0f} ms | peak memory "
        f"{s.peak_memory_gb:.2f} GB"
    )
