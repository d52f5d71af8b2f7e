"""The scheduler: which requests run in the next step, and how many of their tokens.

Each step has a budget of `max_batch_tokens` tokens (chunked prefill, as vLLM and SGLang schedule it).
Running requests go first, oldest first: a decoding request costs one token, a request still in its
prompt costs the next chunk of it. What budget is left admits waiting requests in arrival order, while
fewer than `max_num_seqs` run and the pool has blocks for them, each starting after the longest prefix
the cache already holds (engine/blocks.py).

When a running request needs a block and none is free, the newest running request is preempted: its
blocks are released (they stay cached, so its recompute is mostly a cache hit) and it goes back to the
front of the queue with its output kept. Its next tokens do not change — sampling noise depends only on
the request's seed and the index of the token drawn (engine/sampling.py).

With `span` set (max_kv_size caps the full layers, so no layer looks further back than `span` keys), a
block whose positions have all left every layer's window is released as soon as that happens; without
it, a request keeps its blocks until it finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ossq.engine.blocks import RELEASED, BlockManager
from ossq.engine.kv import BLOCK_TOKENS, blocks_for
from ossq.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from ossq.engine.constrain import Constraint


@dataclass(eq=False)
class Request:
    """One sequence: its prompt and output tokens, its blocks, and how far its keys are computed.
    `logits_from` asks for the logits of every position from there on (scoring)."""

    id: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int
    stop: frozenset[int]
    logits_from: int | None = None
    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # prefix-cache keys of the full blocks, in order
    num_computed: int = 0  # positions whose keys and values are in the pool
    cached_tokens: int = 0  # positions taken from the prefix cache at the last admission
    finish_reason: str | None = None
    constraint: Constraint | None = None  # what its next tokens may be (engine/constrain.py)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next one can be sampled."""
        return len(self.tokens) - self.num_computed


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_batch_tokens: int, span: int | None) -> None:
        self.blocks, self.span = blocks, span
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def max_blocks(self, total_tokens: int) -> int:
        """The most blocks a request of `total_tokens` positions ever holds at once."""
        whole = blocks_for(total_tokens)
        if self.span is None:
            return whole
        return min(whole, blocks_for(self.span - 1 + self.max_batch_tokens) + 1)

    def schedule(self) -> list[tuple[Request, int]]:
        """The next step: (request, tokens to compute) pairs, running requests first."""
        budget, step = self.max_batch_tokens, []
        for req in list(self.running):
            n = min(req.remaining, budget)
            if req not in self.running or n == 0:
                continue
            if self._grow_or_preempt(req, n):
                step.append((req, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break
            step.append((self.waiting.popleft(), n))
            budget -= n
        return step

    def _grow_or_preempt(self, req: Request, n: int) -> bool:
        """Blocks for `n` more tokens of `req`, preempting the newest requests until they fit."""
        need = blocks_for(req.num_computed + n) - len(req.blocks)
        while need > self.blocks.num_available:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        req.blocks += self.blocks.allocate(need)
        return True

    def _admit(self, req: Request, budget: int) -> int:
        """Start `req` after its cached prefix → tokens it computes this step (0: it does not fit yet)."""
        ids, keys = self.blocks.match(self._reusable(req))
        start = len(ids) * BLOCK_TOKENS
        n = min(len(req.tokens) - start, budget)
        need = blocks_for(start + n) - len(ids)
        if need > self.blocks.available_for(ids):
            return 0
        self.blocks.hold(ids)
        req.blocks, req.keys = ids + self.blocks.allocate(need), keys
        req.num_computed = req.cached_tokens = start
        self.running.append(req)
        return n

    def _reusable(self, req: Request) -> Sequence[int]:
        """The tokens a cached prefix may cover: all but those whose logits the request wants."""
        return req.tokens if req.logits_from is None else req.tokens[: req.logits_from + 1]

    def commit(self, req: Request, n: int) -> None:
        """`n` more positions of `req` were written: key its newly full blocks, release what left every
        window."""
        req.num_computed += n
        if self.blocks.prefix_cache:
            for i in range(len(req.keys), req.num_computed // BLOCK_TOKENS):
                parent = req.keys[-1] if req.keys else None
                chunk = tuple(req.tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
                req.keys.append(self.blocks.register(req.blocks[i], parent, chunk))
        if self.span is not None:
            first_needed = max(0, req.num_computed - self.span + 1) // BLOCK_TOKENS
            for i in range(first_needed):
                if req.blocks[i] != RELEASED:
                    self.blocks.release([req.blocks[i]])
                    req.blocks[i] = RELEASED

    def reserve(self, req: Request, n: int) -> int:
        """Blocks for up to `n` draft tokens after all of `req`'s tokens, from the free ones only (a draft
        never preempts anyone) → how many of the `n` fit."""
        while n > 0 and blocks_for(len(req.tokens) + n) - len(req.blocks) > self.blocks.num_available:
            n -= 1
        req.blocks += self.blocks.allocate(blocks_for(len(req.tokens) + n) - len(req.blocks))
        return n

    def truncate(self, req: Request, length: int) -> None:
        """Forget `req`'s tokens from `length` on and every key past them (rejected draft tokens): a length
        change, whose blocks past the computed positions go back to the pool. A keyed block is never
        written again (it is another request's cached prefix), so one that the cut falls inside is given
        back whole and its valid positions are recomputed in a fresh block."""
        del req.tokens[length:]
        req.num_computed = min(req.num_computed, length)
        full = req.num_computed // BLOCK_TOKENS
        if len(req.keys) > full:
            del req.keys[full:]
            req.num_computed = full * BLOCK_TOKENS
        keep = blocks_for(req.num_computed)
        self.blocks.release(req.blocks[keep:])
        del req.blocks[keep:]

    def preempt(self, req: Request) -> None:
        self._drop(req)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    def finish(self, req: Request) -> None:
        """A finished or aborted request leaves, whether running or waiting."""
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self._drop(req)

    def _drop(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req.blocks)
        req.blocks, req.keys = [], []
