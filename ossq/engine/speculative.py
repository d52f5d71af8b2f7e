"""Speculative decoding: a drafter proposes K tokens, one target forward verifies them, and the target's
distribution is kept exactly.

A step of the engine (engine/engine.py) with a `Speculator`: every decoding request asks its drafter for
up to k draft tokens (k adapted per request, capped by `num_draft_tokens`); they are fed after the
request's last token in the same forward as everything else in the batch, so the step returns k + 1
logits rows for it: row i is the target's distribution p_i for the token after draft i − 1. Then
(Leviathan et al. 2023, Chen et al. 2023), for i = 0 .. k − 1, draft x_i drawn from the drafter's
q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is
drawn from norm(max(0, p_i − q_i)) instead and the rest is dropped; when all k are accepted, one more
token is drawn from p_k. Every committed token is then distributed exactly as plain decoding's. Greedy
is the special case where p_i is one-hot: the longest prefix of drafts equal to the target's argmax,
plus the argmax after it — token for token what plain greedy decoding gives. p_i is `filtered_probs`
of the request's own SamplingParams over the row (repetition penalty counting the draft tokens before
it), so every sampling parameter is honoured; q_i is whatever the drafter drew from (a point mass for
n-gram and greedy drafts), and the rule is exact for any q.

Randomness is counter-based (engine/sampling.py): the accept test and the resample of the token at
output index j use streams of the request's seed xor a salt at counter j, the last token the plain
sampler's own stream, so tokens never depend on the batch; a step without drafts samples exactly as
plain decoding does. Each index's accept test is evaluated at most once (a rejection commits that
index), so reusing a counter in a later step never correlates two decisions.

Rollback is a length change (engine/scheduler.py `truncate`): draft tokens never enter a request's
tokens until accepted, so no prefix-cache block is keyed from an unverified one, and the blocks taken
for rejected drafts go back at once. Every layer, sliding or full, stores every position through the
same block table (engine/kv.py), so the sliding-window layers roll back the same way.

Drafters: `NgramDrafter` (prompt lookup: the continuation of the latest earlier occurrence of the
longest suffix n-gram of prompt + output) and `ModelDrafter` (another checkpoint with the same
vocabulary, its own Engine and KV pool, one draft request per target request, truncated to the target's
committed tokens after every verification).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ossq.config import ModelConfig
from ossq.engine.batch import device_tensor
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.kv import bytes_per_token, default_kv_tokens
from ossq.engine.load import load_model
from ossq.engine.model import GptOss
from ossq.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    exponential_noise,
    filtered_probs,
    sample,
    uniform_noise,
)
from ossq.engine.scheduler import Request, Scheduler
from ossq.errors import InvalidArgument, OssqError
from ossq.formats.hf import read_model_config, resolve

NGRAM = "ngram"  # the --draft-model keyword for prompt lookup
DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx-lm's default
MAX_NGRAM = 4  # the longest suffix the n-gram drafter looks up
# Adaptive K drafts a k-th token only while its chance of being accepted, rate**k, is at least this.
MIN_ACCEPT_CHANCE = 0.3
RATE_DECAY = 0.8  # weight of the past in the running acceptance counts
# While drafting cannot pay, a request still drafts at every PROBE_EVERY-th output position.
PROBE_EVERY = 16
# A verification step in plain decode steps on CUDA. Both replay CUDA graphs now, but K + 1 tokens route
# to up to 4(K + 1) experts where one token reads 4, and the mixture of experts is half a 20b step: 20b
# 4-bit on the H200 with n-gram drafts, K fixed, a drafting step cost 2.57 plain steps at K = 2 and 3.01
# at K = 4 (benchmarks/speculative-h200.md; 6.5 while verification ran eagerly). On the CPU both run
# eagerly and the weights dominate: 1.
CUDA_VERIFY_COST = 2.8
# Salts xor-ed into a request's seed: independent noise streams for the draft model's draws, the accept
# tests and the resamples (below 2**62, so a seed stays inside int64).
DRAFT_SALT, ACCEPT_SALT, RESAMPLE_SALT = 0x2545F4914F6CDD1D, 0x1D8E4E27C47D124F, 0x3C6EF372FE94F82B


@dataclass(frozen=True)
class SpeculativeConfig:
    """What drafts: `draft` is a loaded model or "ngram"; `num_draft_tokens` caps the draft tokens per
    step; `adaptive` lets each request draft fewer while its acceptance is low, and none while drafting
    cannot pay: `verify_cost` is what a verification step costs in plain decode steps (None: the
    device's, `verify_cost`)."""

    draft: GptOss | str
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    adaptive: bool = True
    verify_cost: float | None = None

    def __post_init__(self) -> None:
        check_num_draft_tokens(self.num_draft_tokens)
        if isinstance(self.draft, str) and self.draft != NGRAM:
            raise InvalidArgument("draft_model", f"draft_model must be a model or {NGRAM!r}, got {self.draft!r}")


def check_num_draft_tokens(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidArgument("num_draft_tokens", f"num_draft_tokens must be an int >= 1, got {k!r}")


def check_draft_config(target: ModelConfig, draft: ModelConfig) -> None:
    """A draft model must share the target's vocabulary: its tokens are the target's token ids."""
    if draft.vocab_size != target.vocab_size:
        raise InvalidArgument(
            "draft_model",
            f"draft_model has a vocabulary of {draft.vocab_size} tokens, the model {target.vocab_size}: "
            "a draft model needs the same tokenizer",
        )


def load_draft(draft_model: str | Path, target: GptOss, *, ops: str | None = None) -> GptOss | str:
    """--draft-model's value as `SpeculativeConfig.draft`: "ngram", or the checkpoint loaded as the
    target is (its device and dtype, the same choice of ops), once its vocabulary is known to match."""
    if draft_model == NGRAM:
        return NGRAM
    check_draft_config(target.config, read_model_config(resolve(draft_model))[1])
    return load_model(draft_model, device=target.device, dtype=target.dtype, ops=ops)[0]


@dataclass
class SpecStats:
    """Draft tokens proposed and accepted over `verify_steps` verifications (steps with ≥ 1 draft)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_draft_length(self) -> float:
        """Draft tokens proposed per verification: K, less where adaptive K or max_tokens cut it."""
        return self.draft_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens accepted per verification (0 .. K); each also commits one token of the target's."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass(frozen=True)
class Draft:
    """A drafter's proposal for one request: tokens, and the (k, V) float32 distributions they were
    drawn from (None: each is a point mass, as for n-gram and greedy drafts)."""

    tokens: list[int]
    probs: Tensor | None = None


class Drafter(Protocol):
    def propose(self, wanted: Sequence[tuple[Request, int]]) -> list[Draft]:
        """Up to k draft tokens to follow each request's tokens, for each (request, k)."""

    def sync(self, req: Request) -> None:
        """The request's tokens changed (verified tokens committed): follow them."""

    def forget(self, request_id: int) -> None:
        """The request left: drop what is kept for it."""


# ---- n-gram (prompt lookup) ---------------------------------------------------------------------------
@dataclass
class _NgramIndex:
    """For n = 1 .. MAX_NGRAM: each n-gram of a request's tokens → where its latest occurrence ends."""

    indexed: int = 0  # n-grams ending before this position are in `latest`
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest suffix n-gram
    (n from `max_ngram` down to 1) of prompt + output. An index per request, grown by the new tokens
    only, so a step costs O(new tokens · max_ngram), not a scan of the context."""

    def __init__(self, max_ngram: int = MAX_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.indexes: dict[int, _NgramIndex] = {}

    def propose(self, wanted: Sequence[tuple[Request, int]]) -> list[Draft]:
        return [Draft(self._lookup(req, k)) for req, k in wanted]

    def _lookup(self, req: Request, k: int) -> list[int]:
        tokens, index = req.tokens, self.indexes.setdefault(req.id, _NgramIndex())
        last = len(tokens) - 1  # n-grams ending at the last token are the query, not candidates
        for end in range(index.indexed, last):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                index.latest[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        index.indexed = max(index.indexed, last)
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            follow = index.latest.get(tuple(tokens[-n:]))
            if follow is not None:
                return tokens[follow : follow + k]
        return []

    def sync(self, req: Request) -> None:
        pass  # the index grows from the request's tokens at the next lookup

    def forget(self, request_id: int) -> None:
        self.indexes.pop(request_id, None)


# ---- a draft model -------------------------------------------------------------------------------------
class ModelDrafter:
    """Drafts with another model in its own engine: one draft request per target request, holding the
    target's tokens; `propose` steps the draft engine until each wanted request has its k new tokens
    (requests that want fewer run along and are cut back), `sync` truncates the draft request to what
    the target committed and appends the rest. A request the draft engine refuses (a smaller context,
    say) decodes without drafts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: dict[int, int | None] = {}  # target request id → draft request id (None: refused)

    def propose(self, wanted: Sequence[tuple[Request, int]]) -> list[Draft]:
        ids = [self._draft_request(req) for req, _ in wanted]
        starts = {d: len(self.engine.request(d).tokens) for d in ids if d is not None}
        need = {d: k for d, (_, k) in zip(ids, wanted, strict=True) if d is not None}
        rows: dict[int, list[Tensor]] = {d: [] for d in need}
        while any(self._short(d, starts[d] + k) for d, k in need.items()):
            outputs = self.engine.step()
            if not outputs:
                break
            for out in outputs:
                if out.request_id in rows and out.token is not None and out.logits is not None:
                    rows[out.request_id].append(out.logits[-1])
        return [self._draft(d, starts.get(d, 0), k, rows.get(d, [])) for d, (_, k) in zip(ids, wanted, strict=True)]

    def _short(self, rid: int, length: int) -> bool:
        """Whether draft request `rid` still has fewer than `length` tokens and may get more."""
        dreq = self.engine.request(rid)
        return dreq.finish_reason is None and len(dreq.tokens) < length

    def _draft_request(self, req: Request) -> int | None:
        """The draft request that follows `req`, added the first time (and again if, running along while
        `req` waited, it reached its max_tokens). Its output counts from `req`'s prompt, so the draft's
        draw for output index j uses counter j whenever the draft request was added: the drafts, hence
        the tokens, do not depend on the batch."""
        rid = self.ids.get(req.id, -1)
        if rid is None or (rid >= 0 and self.engine.request(rid).finish_reason is None):
            return rid
        self.forget(req.id)
        params = dataclasses.replace(req.params, seed=req.seed ^ DRAFT_SALT)
        try:  # the target's last token is never drafted, so max_tokens − 1 output tokens are all it needs
            rid = self.engine.add_request(
                req.tokens,
                params,
                max_tokens=req.max_tokens,
                logits_from=None if params.greedy else len(req.tokens) - 1,
                prompt_len=req.prompt_len,
            )
        except OssqError:
            rid = None
        self.ids[req.id] = rid
        return rid

    def _draft(self, rid: int | None, start: int, k: int, rows: list[Tensor]) -> Draft:
        if rid is None:
            return Draft([])
        dreq = self.engine.request(rid)
        tokens = dreq.tokens[start : start + k]
        if dreq.params.greedy:
            return Draft(tokens)
        width = dreq.params.repetition_context if dreq.params.repetition_penalty != 1 else 0
        recent = [dreq.tokens[: start + i][-width:] for i in range(len(tokens))] if width else None
        return Draft(tokens, _probs(torch.stack(rows[: len(tokens)]), [dreq.params] * len(tokens), recent))

    def sync(self, req: Request) -> None:
        rid = self.ids.get(req.id)
        if rid is None:
            return
        dreq = self.engine.request(rid)
        common = _common_prefix(dreq.tokens, req.tokens)
        self.engine.scheduler.truncate(dreq, common)
        dreq.tokens.extend(req.tokens[common:])

    def forget(self, request_id: int) -> None:
        rid = self.ids.pop(request_id, None)
        if rid is not None:
            self.engine.abort(rid)
            self.engine.release(rid)


def _common_prefix(a: list[int], b: list[int], tail: int = 64) -> int:
    """The length of the longest common prefix of `a` and `b`. They differ, if at all, near their ends
    (in the drafts of the last step), so all but the last `tail` positions are compared at C speed."""
    n = min(len(a), len(b))
    start = max(0, n - tail)
    if a[:start] != b[:start]:
        start = 0
    return next((i for i in range(start, n) if a[i] != b[i]), n)


# ---- the speculator -------------------------------------------------------------------------------------
@dataclass
class _RequestState:
    accepted: float = 0.0  # decayed counts of accepted draft tokens and of accept tests evaluated
    tests: float = 0.0
    stats: SpecStats = field(default_factory=SpecStats)

    @property
    def rate(self) -> float | None:
        return self.accepted / self.tests if self.tests else None


class Speculator:
    """Drafts for an engine's decoding requests, verifies them and keeps the statistics (module docstring)."""

    def __init__(
        self, drafter: Drafter, *, num_draft_tokens: int, adaptive: bool = True, verify_cost: float = 1.0
    ) -> None:
        check_num_draft_tokens(num_draft_tokens)
        self.drafter, self.num_draft_tokens, self.adaptive = drafter, num_draft_tokens, adaptive
        self.verify_cost = verify_cost
        self.states: dict[int, _RequestState] = {}
        self.stats = SpecStats()

    def draft_length(self, request_id: int, position: int = 0) -> int:
        """k for the request's step that samples output token `position`: the most tokens each accepted
        with chance ≥ MIN_ACCEPT_CHANCE at its running acceptance rate, at least 1 and at most
        `num_draft_tokens`; 0 while the tokens a verification is expected to commit do not cover its
        `verify_cost`, but for a probe every PROBE_EVERY positions that keeps the rate measured. A pure
        function of the request's tokens, so its output never depends on timing or on the batch."""
        rate = self.states[request_id].rate if request_id in self.states else None
        if not self.adaptive or rate is None or rate >= 1:
            return self.num_draft_tokens
        k = 1 if rate <= 0 else math.floor(math.log(MIN_ACCEPT_CHANCE) / math.log(rate))
        k = max(1, min(self.num_draft_tokens, k))
        expected = (1 - rate ** (k + 1)) / (1 - rate)  # tokens a verification of k drafts commits
        return 0 if expected < self.verify_cost and position % PROBE_EVERY else k

    def draft(self, plan: Sequence, scheduler: Scheduler) -> None:
        """Give each decoding request of the step being built (engine `_Planned`s) its draft tokens,
        as many as fit in its max_tokens and in the free blocks. A constrained request (engine/constrain.py)
        drafts nothing: the engine's sampler alone applies its constraint."""
        decoding = [p for p in plan if p.samples and p.end - p.start == 1 and p.req.constraint is None]
        wanted = [(p, min(self._length(p.req), p.req.max_tokens - len(p.req.output) - 1)) for p in decoding]
        wanted = [(p, k) for p, k in wanted if k > 0]
        if not wanted:
            return
        for (p, _), d in zip(wanted, self.drafter.propose([(p.req, k) for p, k in wanted]), strict=True):
            n = scheduler.reserve(p.req, len(d.tokens))
            p.draft, p.draft_probs = list(d.tokens[:n]), None if d.probs is None else d.probs[:n]

    @torch.inference_mode()
    def verify(self, logits: Tensor, samplers: Sequence) -> list[tuple[int, int]]:
        """The verdict on each request of a step that fed draft tokens: (draft tokens accepted, the next
        token), from the last len(draft) + 1 of its logits rows. One device read for the whole step."""
        rows, params, recent, seeds, counters, drafts = [], [], [], [], [], []
        for p in samplers:
            req, k = p.req, len(p.draft)
            rows += range(p.first_row + p.num_rows - k - 1, p.first_row + p.num_rows)
            params += [req.params] * (k + 1)
            width = req.params.repetition_context if req.params.repetition_penalty != 1 else 0
            recent += [(req.tokens + p.draft[:i])[-width:] if width else [] for i in range(k + 1)]
            seeds += [req.seed] * (k + 1)
            counters += range(len(req.output), len(req.output) + k + 1)
            drafts += [*p.draft, -1]
        device = logits.device
        x = logits[device_tensor(rows, torch.int64, device)]  # (N, V)
        probs = _probs(x, params, recent if any(recent) else None)
        q = _draft_probs(samplers, x.shape[-1], device)
        verdict = _verdict(x, probs, q, params, recent if any(recent) else None, seeds, counters, drafts)
        accept, resampled, plain = verdict.tolist()
        out, i = [], 0
        for p in samplers:
            k = len(p.draft)
            a = next((j for j in range(k) if not accept[i + j]), k)
            out.append((a, resampled[i + a] if a < k else plain[i + k]))
            self._record(p.req.id, k, a)
            i += k + 1
        return out

    def _length(self, req: Request) -> int:
        return self.draft_length(req.id, len(req.output))

    def _record(self, request_id: int, drafted: int, accepted: int) -> None:
        state = self.states.setdefault(request_id, _RequestState())
        state.accepted = RATE_DECAY * state.accepted + accepted
        state.tests = RATE_DECAY * state.tests + accepted + (accepted < drafted)
        state.stats.add(drafted, accepted)
        self.stats.add(drafted, accepted)

    def advance(self, req: Request) -> None:
        """After a request's step is booked: the drafter follows its tokens, or forgets it if it finished."""
        if req.finish_reason:
            self.drafter.forget(req.id)
        else:
            self.drafter.sync(req)

    def request_stats(self, request_id: int) -> SpecStats:
        state = self.states.get(request_id)
        return state.stats if state is not None else SpecStats()

    def forget(self, request_id: int) -> None:
        self.drafter.forget(request_id)

    def release(self, request_id: int) -> None:
        self.drafter.forget(request_id)
        self.states.pop(request_id, None)


def _probs(x: Tensor, params: Sequence[SamplingParams], recent: Sequence[Sequence[int]] | None) -> Tensor:
    """(N, V) float32: each row's distribution under its params, as the sampler draws from it."""
    batch = SamplingBatch.from_params(params, x.device)
    return filtered_probs(x, batch, _recent_tensor(recent, x.device))


def _recent_tensor(recent: Sequence[Sequence[int]] | None, device: torch.device) -> Tensor | None:
    """Rows of recent tokens, oldest first, −1 padded on the left to one width (as the engine's)."""
    if recent is None:
        return None
    width = max(1, max(len(r) for r in recent))
    return device_tensor([[-1] * (width - len(r)) + list(r) for r in recent], torch.int64, device)


def _draft_probs(samplers: Sequence, vocab: int, device: torch.device) -> Tensor:
    """(N, V) the drafts' q rows in verification order: the drafter's distributions, one-hot rows for
    point masses, a zero row for each request's last (draft-less) row."""
    parts = []
    for p in samplers:
        k = len(p.draft)
        if p.draft_probs is not None:
            q = p.draft_probs.float()
        else:
            q = torch.zeros(k, vocab, device=device)
            q[torch.arange(k, device=device), device_tensor(p.draft, torch.int64, device)] = 1.0
        parts += [q, torch.zeros(1, vocab, device=device)]
    return torch.cat(parts)


def _verdict(
    x: Tensor,
    p: Tensor,
    q: Tensor,
    params: Sequence[SamplingParams],
    recent: Sequence[Sequence[int]] | None,
    seeds: list[int],
    counters: list[int],
    drafts: list[int],
) -> Tensor:
    """(3, N) int64 for N verification rows: whether the row's draft token passes its accept test, the
    token resampled from norm(max(0, p − q)) should it not, and the token plain decoding draws from p."""
    device = x.device
    seed = device_tensor(seeds, torch.int64, device)
    counter = device_tensor(counters, torch.int64, device)
    token = device_tensor(drafts, torch.int64, device).clamp_min(0)[:, None]
    px, qx = p.gather(-1, token)[:, 0], q.gather(-1, token)[:, 0]
    u = uniform_noise(seed ^ ACCEPT_SALT, counter, 1)[:, 0]
    accept = u * qx < px  # u < p/q, without dividing by a q of 0 on the draft-less rows
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
    resampled = (residual / exponential_noise(seed ^ RESAMPLE_SALT, counter, x.shape[-1])).argmax(-1)
    batch = SamplingBatch.from_params(params, device)
    plain = sample(x, batch, seeds=seed, counters=counter, recent=_recent_tensor(recent, device))
    return torch.stack([accept.long(), resampled, plain])


# ---- building an engine that speculates -------------------------------------------------------------------
def speculative_engine(model: GptOss, config: EngineConfig | None, spec: SpeculativeConfig) -> Engine:
    """An engine over `model` that speculates as `spec` says. A draft model gets its own engine; unless
    `config` sizes the KV pool, the two pools split the default pool's memory in proportion to their
    bytes per token."""
    config = config or EngineConfig()
    if isinstance(spec.draft, str):
        drafter: Drafter = NgramDrafter()
    else:
        check_draft_config(model.config, spec.draft.config)
        if config.max_kv_size is not None:
            raise InvalidArgument(
                "max_kv_size", "max_kv_size with a draft model is not supported (use --draft-model ngram, or no cap)"
            )
        if config.kv_cache_tokens is None:
            config = dataclasses.replace(config, kv_cache_tokens=_shared_kv_tokens(model, spec.draft))
        # the drafter truncates and re-feeds its requests between steps: no step may be launched ahead
        draft_engine = Engine(spec.draft, dataclasses.replace(config, overlap=False))
        drafter = ModelDrafter(draft_engine)
    cost = spec.verify_cost if spec.verify_cost is not None else verify_cost(model.device)
    speculator = Speculator(drafter, num_draft_tokens=spec.num_draft_tokens, adaptive=spec.adaptive, verify_cost=cost)
    return Engine(model, config, speculator=speculator)


def verify_cost(device: torch.device) -> float:
    """What a verification step costs on `device`, in plain decode steps (SpeculativeConfig)."""
    return CUDA_VERIFY_COST if device.type == "cuda" else 1.0


def _shared_kv_tokens(target: GptOss, draft: GptOss) -> int:
    """Tokens each of the two pools holds when together they take what one default pool would."""
    per_target = bytes_per_token(target.config, target.dtype)
    per_draft = bytes_per_token(draft.config, draft.dtype)
    whole = default_kv_tokens(target.config, target.dtype, target.device)
    return max(16, whole * per_target // (per_target + per_draft))
