"""Token sampling: per-request SamplingParams and a Sampler that never syncs with the host.

The pipeline, applied to logits (B, V) in this order:

1. repetition penalty on the `recent` tokens (CTRL rule, as mlx-lm: logit > 0 is divided by the
   penalty, otherwise multiplied), computed in float32;
2. temperature 0 stops here: the token is the argmax;
3. logits / temperature, in float32;
4. top-k: keep the k largest logits;
5. top-p (nucleus): keep the smallest set of most probable tokens whose mass reaches top_p;
6. min-p: drop tokens whose probability is below min_p x the top probability;
7. draw from softmax of what is left.

Every filter keeps the most probable token, so the distribution is never empty. Each filter sees
the distribution renormalized after the previous one. Ties at a filter's cut-off are all kept.

The draw is the exponential race (as gpt-fast): argmax(p / q) with q ~ Exponential(1) i.i.d. picks
index i with probability exactly p_i, and needs neither a host sync nor a cumulative-sum search,
so the whole call can run inside a CUDA graph. Nothing here reads a tensor value on the host; the
only branches are on the params and on shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# float32 cumulative sums are off by a few ulps; without slack a nucleus that reaches top_p
# exactly on paper (0.6 + 0.3 vs 0.9) could pick up one more token depending on rounding.
TOP_P_SLACK = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens. The defaults are greedy decoding, no filters.

    `repetition_context` is how many of the most recent tokens the repetition penalty looks at.
    `seed` makes sampling reproducible: the same seed gives the same tokens for the same logits.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        # Conditions are stated as what must hold, so NaN fails them too.
        self._check("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)")
        self._check("top_k", _is_int(self.top_k) and self.top_k >= 0, "must be an int >= 0 (0 = off)")
        self._check("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)")
        self._check("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 = off)")
        self._check("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)")
        context_ok = _is_int(self.repetition_context) and self.repetition_context >= 0
        self._check("repetition_context", context_ok, "must be an int >= 0")
        self._check("seed", self.seed is None or _is_int(self.seed), "must be an int or None")

    def _check(self, field: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r} {rule}")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0); the filters then have no effect."""
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def penalize_repeats(logits: Tensor, recent: Tensor | None, params: SamplingParams) -> Tensor:
    """Logits (B, V), any float dtype -> float32 (B, V) with the repetition penalty applied.

    `recent` (B, n) holds token ids, oldest first; only the last `params.repetition_context` columns
    count, and negative ids mark empty slots (so a fixed-size buffer can be passed before it fills).
    Each distinct token is penalized once, however often it repeats. The input is not modified.
    """
    x = logits.float()
    if recent is None or params.repetition_penalty == 1 or params.repetition_context == 0:
        return x
    batch, vocab = x.shape
    window = recent[:, -params.repetition_context :].long()
    # Empty slots point at an extra column that is dropped, so no value-dependent branch is needed.
    ids = torch.where(window >= 0, window, vocab)
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=x.device).scatter_(1, ids, True)
    penalty = params.repetition_penalty
    penalized = torch.where(x > 0, x / penalty, x * penalty)
    return torch.where(seen[:, :vocab], penalized, x)


def filtered_probs(logits: Tensor, params: SamplingParams, recent: Tensor | None = None) -> Tensor:
    """The distribution (B, V) float32 that `Sampler` draws from, rows summing to 1.

    For greedy params it is one-hot at the argmax of the penalized logits.
    """
    x = penalize_repeats(logits, recent, params)
    if params.greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    weights = _filtered_weights(x, params)
    return weights / weights.sum(-1, keepdim=True)


def _filtered_weights(x: Tensor, params: SamplingParams) -> Tensor:
    """Penalized float32 logits (B, V) -> unnormalized probabilities p_i / p_max in [0, 1], 0 where
    top-k, top-p or min-p drop a token. The top token's weight is exactly 1.

    Not normalized because the draw does not need it, and spelled as exp(x - max) rather than
    torch.softmax because CUDA softmax gives one row one block: ~50 us for a 201k vocabulary.
    """
    x = x / params.temperature
    weights = torch.exp(x - x.amax(-1, keepdim=True))
    if 0 < params.top_k < x.shape[-1] or params.top_p < 1:
        weights = weights.masked_fill(x < _nucleus_floor(x, params), 0.0)
    if params.min_p > 0:
        # p_i / p_max does not change when top-k or top-p renormalize, and the top token survives
        # them, so min-p reads the same off the unfiltered weights.
        weights = weights.masked_fill(weights < params.min_p, 0.0)
    return weights


def _nucleus_floor(x: Tensor, params: SamplingParams) -> Tensor:
    """Scaled logits (B, V) -> (B, 1): the smallest logit that top-k and then top-p keep."""
    if 0 < params.top_k < x.shape[-1]:
        candidates = torch.topk(x, params.top_k, dim=-1).values  # (B, k), descending
    else:
        candidates = torch.sort(x, dim=-1, descending=True).values  # (B, V)
    if params.top_p == 1:
        return candidates[:, -1:]
    weights = torch.exp(candidates - candidates[:, :1])
    probs = weights / weights.sum(-1, keepdim=True)  # renormalized over what top-k left
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more probable tokens
    # mass_before is non-decreasing, so the count of tokens still short of top_p is the nucleus size.
    kept = (mass_before < params.top_p - TOP_P_SLACK).sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    return candidates.gather(-1, kept - 1)


class Sampler:
    """Draws one token per row from logits, reproducibly and without host syncs.

    Owns a `torch.Generator` on `device`, seeded from `params.seed` (a random seed when None), so
    one Sampler replays the same token stream for the same logits. For use inside a captured CUDA
    graph the generator must be registered with the graph (`torch.cuda.CUDAGraph.register_generator_state`).
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: Tensor, recent: Tensor | None = None) -> Tensor:
        """logits (B, V) any float dtype on the generator's device, recent (B, n) ids or None
        -> tokens (B,) int64. See the module docstring for the order of operations."""
        if self.params.greedy:
            return penalize_repeats(logits, recent, self.params).argmax(-1)
        weights = _filtered_weights(penalize_repeats(logits, recent, self.params), self.params)
        noise = torch.empty_like(weights).exponential_(generator=self.generator)
        # A zero draw would make 0/0 = NaN at a filtered token, and argmax prefers NaN. The CPU
        # exponential_ can return exactly 0 (pytorch/pytorch#22557), so floor the noise; weights
        # are at most 1, so the quotient stays finite.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return (weights / noise).argmax(-1)
