"""Token sampling for a batch of requests, each with its own SamplingParams, without host syncs.

The pipeline, applied to each row of logits (B, V) with that row's params, in this order:

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
so the whole call can run inside a CUDA graph. The noise is counter-based rather than drawn from a
generator: q[r, v] is a hash of (seed, counter, v), where the counter is the index of the token in
its request's output. A row's token is then a function of its own logits, params, seed, counter and
recent tokens alone: it does not change with the rest of the batch, and a request that is preempted
and recomputed redraws the same tokens. Nothing here reads a tensor value on the host; the only
branches are on the host-side flags of a SamplingBatch and on shapes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ossq.engine.batch import device_tensor
from ossq.errors import InvalidArgument

# float32 cumulative sums are off by a few ulps; without slack a nucleus that reaches top_p
# exactly on paper (0.6 + 0.3 vs 0.9) could pick up one more token depending on rounding.
TOP_P_SLACK = 1e-6

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MASK32 = 0xFFFFFFFF
# lowbias32's multipliers (Chris Wellons, hash-prospector). The second is stored as its value minus
# 2**32, equal mod 2**32, so that x * c for x < 2**32 stays inside int64 and never overflows.
_LOWBIAS32_MUL1 = 0x7FEB352D
_LOWBIAS32_MUL2 = 0x846CA68B - 2**32
# 23 of the hash's bits make the uniform: (m + 0.5) / 2**23 is exact in float32 and lies in
# [2**-24, 1 - 2**-24]. With 24 bits the top value, 1 - 2**-25, would round to 1 and give q = 0.
_UNIFORM_BITS = 23


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens. The defaults are greedy decoding, no filters.

    `repetition_context` is how many of the most recent tokens the repetition penalty looks at.
    `seed` makes sampling reproducible: the same seed gives the same tokens for the same logits.
    None asks the engine for a fresh one (`random_seed`).
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
        seed_ok = self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX)
        self._check("seed", seed_ok, "must be None or an int that fits in int64")

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise InvalidArgument(name, f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0); the filters then have no effect."""
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def random_seed() -> int:
    """A fresh seed in [0, 2**63) from the OS, for a request whose params.seed is None."""
    return secrets.randbits(63)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """The params of B requests as per-row tensors on one device, plus host flags that skip work.

    Tensors are (B,): temperature, top_p, min_p, repetition_penalty float32; top_k and
    repetition_context int64. Greedy rows (temperature 0) hold the neutral filter values (top_k 0,
    top_p 1, min_p 0), since no filter applies to them. The flags are computed from the params, not
    read back from the tensors, so branching on them never syncs:

    - `all_greedy`: every row is argmax, so no filter or noise is computed;
    - `any_top_k_or_top_p`, `any_min_p`, `any_penalty`: some row uses that step;
    - `top_k_width`: how many of a row's largest logits top-k and top-p need to see, the max top_k
      over the rows that use either; 0 when some row's top-p needs the whole vocabulary.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    repetition_penalty: Tensor
    repetition_context: Tensor
    all_greedy: bool
    any_top_k_or_top_p: bool
    any_min_p: bool
    any_penalty: bool
    top_k_width: int

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> SamplingBatch:
        """One row per params, in order. Host work plus one host-to-device copy per tensor."""
        filters = [_filters(p) for p in params]  # (top_k, top_p, min_p) per row

        def column(values: list, dtype: torch.dtype) -> Tensor:
            return device_tensor(values, dtype, device)

        return cls(
            temperature=column([p.temperature for p in params], torch.float32),
            top_k=column([top_k for top_k, _, _ in filters], torch.int64),
            top_p=column([top_p for _, top_p, _ in filters], torch.float32),
            min_p=column([min_p for _, _, min_p in filters], torch.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
            repetition_context=column([p.repetition_context for p in params], torch.int64),
            all_greedy=all(p.greedy for p in params),
            any_top_k_or_top_p=any(top_k > 0 or top_p < 1 for top_k, top_p, _ in filters),
            any_min_p=any(min_p > 0 for _, _, min_p in filters),
            any_penalty=any(p.repetition_penalty != 1 and p.repetition_context > 0 for p in params),
            top_k_width=_top_k_width(filters),
        )

    def candidate_count(self, vocab: int) -> int:
        """How many of each row's largest logits top-k and top-p look at, for a vocabulary of V."""
        return vocab if self.top_k_width == 0 else min(self.top_k_width, vocab)


def _filters(params: SamplingParams) -> tuple[int, float, float]:
    """(top_k, top_p, min_p) that apply to a row: none for a greedy one."""
    return (0, 1.0, 0.0) if params.greedy else (params.top_k, params.top_p, params.min_p)


def _top_k_width(filters: list[tuple[int, float, float]]) -> int:
    """The max top_k over rows that use top-k or top-p; 0 when one uses top-p over the whole vocabulary."""
    nucleus = [top_k for top_k, top_p, _ in filters if top_k > 0 or top_p < 1]
    return 0 if 0 in nucleus else max(nucleus, default=0)


def penalize_repeats(logits: Tensor, recent: Tensor | None, batch: SamplingBatch) -> Tensor:
    """Logits (B, V), any float dtype -> float32 (B, V) with each row's repetition penalty applied.

    `recent` (B, R) int64 holds token ids < V, oldest first, with -1 marking empty slots (so a
    fixed-size window can be passed before it fills); row r counts only its last
    `repetition_context[r]` columns. Each distinct token is penalized once, however often it
    repeats. The input is not modified.
    """
    x = logits.float()
    if recent is None or not batch.any_penalty:
        return x
    seen = _seen(recent, batch.repetition_context, x.shape[-1])
    penalty = batch.repetition_penalty[:, None]  # (B, 1); rows at 1 come out unchanged
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def _seen(recent: Tensor, context: Tensor, vocab: int) -> Tensor:
    """recent (B, R) ids, context (B,) -> (B, V) bool: the tokens among each row's counted slots."""
    width = recent.shape[-1]
    in_context = torch.arange(width, device=recent.device) >= width - context[:, None]  # (B, R)
    # Slots that do not count point at an extra column that is dropped: no value-dependent branch.
    ids = torch.where(in_context & (recent >= 0), recent, vocab)
    seen = torch.zeros(recent.shape[0], vocab + 1, dtype=torch.bool, device=recent.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def filtered_probs(logits: Tensor, batch: SamplingBatch, recent: Tensor | None = None) -> Tensor:
    """The distribution (B, V) float32 that `sample` draws each row from, rows summing to 1.

    A greedy row is one-hot at the argmax of its penalized logits.
    """
    x = penalize_repeats(logits, recent, batch)
    one_hot = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    if batch.all_greedy:
        return one_hot
    weights = _filtered_weights(x, batch)
    return torch.where(batch.temperature[:, None] == 0, one_hot, weights / weights.sum(-1, keepdim=True))


def sample(
    logits: Tensor, batch: SamplingBatch, *, seeds: Tensor, counters: Tensor, recent: Tensor | None = None
) -> Tensor:
    """Logits (B, V) any float dtype -> tokens (B,) int64, one draw per row from `filtered_probs`.

    `seeds` (B,) int64 are the requests' seeds and `counters` (B,) int64 the index of the token being
    drawn in each request's output (0 for the first generated token); the noise is a function of
    the pair, so the same pair redraws the same token. Greedy rows ignore both. No host sync, so
    the call can be captured in a CUDA graph. Allocates a few (B, V) int64 temporaries.
    """
    x = penalize_repeats(logits, recent, batch)
    greedy = x.argmax(-1)
    if batch.all_greedy:
        return greedy
    race = _filtered_weights(x, batch) / exponential_noise(seeds, counters, x.shape[-1])
    return torch.where(batch.temperature == 0, greedy, race.argmax(-1))


def ranking_keys(
    logits: Tensor, batch: SamplingBatch, *, seeds: Tensor, counters: Tensor, recent: Tensor | None = None
) -> Tensor:
    """(B, V) float32 keys whose argmax is the token `sample` draws: the race values (0 for a token the
    filters drop), or a greedy row's penalized logits. Ranking a row by them is the sampler's order of
    preference, so the best-ranked token of any subset is a draw from the row's distribution restricted
    to the subset (engine/constrain.py)."""
    x = penalize_repeats(logits, recent, batch).float()
    if batch.all_greedy:
        return x
    race = _filtered_weights(x, batch) / exponential_noise(seeds, counters, x.shape[-1])
    return torch.where(batch.temperature[:, None] == 0, x, race)


def _filtered_weights(x: Tensor, batch: SamplingBatch) -> Tensor:
    """Penalized float32 logits (B, V) -> unnormalized probabilities p_i / p_max in [0, 1], 0 where
    top-k, top-p or min-p drop a token. The top token's weight is exactly 1. Greedy rows are
    computed at temperature 1 and meaningless; callers replace them.

    Not normalized because the draw does not need it, and spelled as exp(x - max) rather than
    torch.softmax because CUDA softmax gives one row one block: ~50 us for a 201k vocabulary.
    """
    scaled = x / torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    weights = torch.exp(scaled - scaled.amax(-1, keepdim=True))
    if batch.any_top_k_or_top_p:
        weights = weights.masked_fill(scaled < _nucleus_floor(scaled, batch), 0.0)
    if batch.any_min_p:
        # p_i / p_max does not change when top-k or top-p renormalize, and the top token survives
        # them, so min-p reads the same off the unfiltered weights.
        weights = weights.masked_fill(weights < batch.min_p[:, None], 0.0)
    return weights


def _nucleus_floor(scaled: Tensor, batch: SamplingBatch) -> Tensor:
    """Scaled logits (B, V) -> (B, 1): the smallest logit that top-k and then top-p keep in each row,
    -inf in rows that use neither.

    One topk (or sort) serves every row: it takes the largest `candidate_count` logits, and each row
    then reads its own cut-off out of them by gather.
    """
    vocab = scaled.shape[-1]
    width = batch.candidate_count(vocab)
    if width < vocab:
        candidates = torch.topk(scaled, width, dim=-1).values  # (B, W), descending
    else:
        candidates = torch.sort(scaled, dim=-1, descending=True).values  # (B, V)
    top_k = torch.where(batch.top_k > 0, batch.top_k.clamp_max(width), width)[:, None]  # (B, 1)
    floor = candidates.gather(-1, _nucleus_size(candidates, top_k, batch.top_p) - 1)
    uses_either = ((batch.top_k > 0) & (batch.top_k < vocab)) | (batch.top_p < 1)
    return torch.where(uses_either[:, None], floor, -math.inf)


def _nucleus_size(candidates: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Descending logits (B, W), top_k (B, 1) in [1, W], top_p (B,) -> (B, 1) int64 in [1, top_k]:
    how many of the first top_k candidates the nucleus of their renormalized distribution holds.

    Mass is compared unnormalized, against top_p x the prefix sum at top_k, so that a row's result
    does not depend on W (which the other rows of the batch set): it reads only its first top_k
    prefix sums, and a cumulative sum's prefixes do not change with the length.
    """
    in_top_k = torch.arange(candidates.shape[-1], device=candidates.device) < top_k  # (B, W)
    weights = torch.exp(candidates - candidates[:, :1]).masked_fill(~in_top_k, 0.0)
    mass = torch.cumsum(weights, dim=-1)
    budget = torch.where(top_p < 1, top_p - TOP_P_SLACK, math.inf)[:, None] * mass.gather(-1, top_k - 1)
    # mass - weights, the mass of strictly more probable tokens, is non-decreasing, so the count of
    # tokens still short of the budget is the nucleus size.
    kept = ((mass - weights < budget) & in_top_k).sum(-1, keepdim=True)
    return kept.clamp_min(1)


def exponential_noise(seeds: Tensor, counters: Tensor, vocab: int) -> Tensor:
    """seeds (B,), counters (B,) int64 -> q (B, V) float32, Exponential(1) and finite, q > 0.

    q = -log(u) of `uniform_noise`. The grid of u means a token whose weight is below ~4e-9 of the top
    token's is never drawn.
    """
    return -torch.log(uniform_noise(seeds, counters, vocab))


def uniform_noise(seeds: Tensor, counters: Tensor, width: int) -> Tensor:
    """seeds (B,), counters (B,) int64 -> u (B, W) float32, uniform in (0, 1) on a grid of 2**23 values.

    u[r, v] is a pure function of (seeds[r], counters[r], v): a 32-bit hash made a uniform. Speculative
    decoding (engine/speculative.py) draws its accept tests and resamples from streams of other seeds.
    """
    tokens = _lowbias32(torch.arange(width, device=seeds.device))  # (W,)
    bits = _lowbias32(_row_keys(seeds, counters)[:, None] ^ tokens)  # (B, W) in [0, 2**32)
    return _open_unit(bits)


def _row_keys(seeds: Tensor, counters: Tensor) -> Tensor:
    """(B,) int64 seeds (any int64) and counters -> (B,) 32-bit keys mixing all 64 seed bits."""
    seed_key = _lowbias32(_lowbias32((seeds >> 32) & MASK32) ^ (seeds & MASK32))
    # Hashing the counter before mixing it in keeps two seeds whose keys differ by a small xor from
    # replaying each other's stream shifted.
    return _lowbias32(seed_key ^ _lowbias32(counters & MASK32))


def _lowbias32(x: Tensor) -> Tensor:
    """int64 values in [0, 2**32) -> their lowbias32 hash, in [0, 2**32).

    torch's >> on int64 is arithmetic, so values are kept non-negative and masked after each
    multiply; see _LOWBIAS32_MUL2 for why the products do not overflow.
    """
    x = x ^ (x >> 16)
    x = (x * _LOWBIAS32_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _LOWBIAS32_MUL2) & MASK32
    return x ^ (x >> 16)


def _open_unit(bits: Tensor) -> Tensor:
    """int64 hashes in [0, 2**32) -> float32 uniforms strictly inside (0, 1)."""
    top = (bits >> (32 - _UNIFORM_BITS)).float()
    return (top + 0.5) * 2.0**-_UNIFORM_BITS
