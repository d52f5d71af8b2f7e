"""The engine: many requests at once over one paged KV pool — `add_request`, `step`, `abort`.

Each `step` asks the scheduler (engine/scheduler.py) what to run, builds the step's `Batch`, runs one
forward of the model over all of it, samples every request that reached the end of its tokens, and then
reads the sampled tokens back to the host — the step's only synchronisation — to check stops and
lengths. A request's tokens depend only on its own prompt, parameters and seed, never on what else is
in the batch: each row is sampled with its own parameters and counter-based noise. With a `Speculator`
(engine/speculative.py), decoding requests also feed draft tokens, the forward verifies them, and a
step may commit several tokens of a request.

That read is where the device would wait for the host: booking a step, scheduling the next and loading
its inputs take the host a few hundred microseconds, as long as a small model's whole decode step on
a GPU. With `overlap` (on by default on CUDA) a step of pure decoding is followed at once by the next
one, launched before the first is booked and fed the first's sampled tokens on the device, so the host
books step t while the device runs step t + 1. It happens only where the next schedule is certain to
be that step (`_launch_next`); a request that step t stops has its row of step t + 1 dropped unread
(its key and value went to its own released, never-keyed last block), so the tokens are exactly the
synchronous engine's.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ossq.engine.batch import Batch, SeqChunk, device_tensor
from ossq.engine.blocks import BlockManager
from ossq.engine.constrain import constrained_choice
from ossq.engine.graphs import DecodeGraphs
from ossq.engine.kv import BLOCK_TOKENS, KVPool, blocks_for, default_kv_tokens
from ossq.engine.model import GptOss
from ossq.engine.sampling import SamplingBatch, SamplingParams, random_seed, ranking_keys, sample
from ossq.engine.scheduler import Request, Scheduler
from ossq.errors import InvalidArgument, PromptTooLong

if TYPE_CHECKING:
    from ossq.engine.constrain import Constraint
    from ossq.engine.speculative import Speculator

PREFILL_CHUNK_TOKENS = 512
GRAPH_CHUNK_TOKENS = 16  # a chunk up to this long always replays as one-token rows (_token_rows) …
ROW_KEYS = 1 << 18  # … a longer one (a prompt) while its rows attend to at most this many keys in all


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. `kv_cache_tokens` sizes the pool (None: engine/kv.py's default);
    `max_batch_tokens` is the step's token budget (prefill chunk); `max_kv_size` caps the keys the
    full-attention layers see, as mlx-lm's option; `cuda_graphs` replays decode steps as CUDA graphs
    where the ops allow it (on CUDA with the Triton ops, engine/graphs.py); `overlap` launches each
    decode step before the one before it is booked (module docstring; None: on CUDA, where the device
    runs ahead of the host)."""

    kv_cache_tokens: int | None = None
    max_num_seqs: int = 64
    max_batch_tokens: int = PREFILL_CHUNK_TOKENS
    max_kv_size: int | None = None
    prefix_cache: bool = True
    cuda_graphs: bool = True
    overlap: bool | None = None

    def __post_init__(self) -> None:
        for name in ("kv_cache_tokens", "max_kv_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgument(name, f"{name} must be at least 1, got {value}")
        for name in ("max_num_seqs", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one request: the token it sampled (if it reached the end of its tokens),
    whether it finished, and for scoring requests the logits of the positions computed (rows from
    position `logits_start`: row i predicts the token after position logits_start + i)."""

    request_id: int
    token: int | None
    finish_reason: str | None
    logits: torch.Tensor | None = None
    logits_start: int = 0


@dataclass
class RequestTimes:
    added: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class EngineStats:
    """Running totals since the engine started."""

    steps: int = 0
    computed_tokens: int = 0  # positions run through the model (prefix-cache hits excluded)
    generated_tokens: int = 0
    overlapped: int = 0  # steps launched before the step before them was booked (`overlap`)
    times: dict[int, RequestTimes] = field(default_factory=dict)


class Engine:
    def __init__(
        self, model: GptOss, config: EngineConfig | None = None, *, speculator: Speculator | None = None
    ) -> None:
        self.model, self.config, self.speculator = model, config or EngineConfig(), speculator
        c, mc = self.config, model.config
        tokens = c.kv_cache_tokens or default_kv_tokens(mc, model.dtype, model.device)
        if tokens < BLOCK_TOKENS:
            raise InvalidArgument("kv_cache_tokens", f"kv_cache_tokens must be at least {BLOCK_TOKENS}, got {tokens}")
        self.num_blocks = tokens // BLOCK_TOKENS
        graph_seqs = model.ops.graph_tokens(mc) if model.device.type == "cuda" else 0  # rows: _token_rows
        # under --ep a step's shapes depend on the other ranks' rows (Parallel.step_rows): no graphs
        self.lockstep = model.parallel.lockstep
        graphs = c.cuda_graphs and graph_seqs > 0 and not self.lockstep
        self.peers_busy = False  # under --ep: whether some rank had work at the last step
        # with graphs, one more block takes the padding rows' writes; the block manager never hands it out
        blocks = self.num_blocks + graphs
        self.kv = KVPool.allocate(mc, num_blocks=blocks, dtype=model.dtype, device=model.device)
        self.blocks = BlockManager(self.num_blocks, prefix_cache=c.prefix_cache)
        self.graphs = (
            DecodeGraphs(model, self.kv, trash_block=self.num_blocks, max_seqs=graph_seqs, max_kv_size=c.max_kv_size)
            if graphs
            else None
        )
        span = (
            None
            if c.max_kv_size is None
            else max(c.max_kv_size, max(mc.window(i) or 0 for i in range(mc.num_hidden_layers)))
        )
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs=c.max_num_seqs, max_batch_tokens=c.max_batch_tokens, span=span
        )
        # one rank only: under --tp/--ep the ranks must step alike, which the overlap does not promise
        overlap = model.device.type == "cuda" if c.overlap is None else c.overlap
        self.overlap = overlap and speculator is None and not model.parallel.active
        self._ahead: _Launched | None = None  # a decode step launched before its predecessor was booked
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._inboxes: dict[int, deque[StepOutput]] = {}

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_blocks * BLOCK_TOKENS

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 256,
        stop: Iterable[int] = (),
        logits_from: int | None = None,
        prompt_len: int | None = None,
        constraint: Constraint | None = None,
    ) -> int:
        """Queue a request → its id. Refused (nothing else disturbed) when it could not run even alone.
        `prompt_len` < len(prompt) continues an output already begun (a draft model following a target
        request, engine/speculative.py): output indices, so sampling counters and max_tokens, count from
        there. `constraint` limits which tokens it may generate (engine/constrain.py)."""
        params = params or SamplingParams()
        begun = len(prompt) if prompt_len is None else prompt_len
        self._check(list(prompt), begun, max_tokens, logits_from)
        seed = random_seed() if params.seed is None else params.seed
        rid = next(self._ids)
        req = Request(rid, begun, list(prompt), params, seed, max_tokens, frozenset(stop), logits_from)
        req.constraint = constraint
        self.requests[rid] = req
        self.stats.times[rid] = RequestTimes(time.perf_counter())
        self.scheduler.add(req)
        return rid

    def _check(self, prompt: list[int], prompt_len: int, max_tokens: int, logits_from: int | None) -> None:
        if not prompt:
            raise InvalidArgument("prompt", "the prompt is empty")
        if max_tokens <= len(prompt) - prompt_len:  # 1 for a new request
            least = len(prompt) - prompt_len + 1
            raise InvalidArgument("max_tokens", f"max_tokens must be at least {least}, got {max_tokens}")
        if logits_from is not None and not 0 <= logits_from < len(prompt):
            raise InvalidArgument("logits_from", f"logits_from must lie inside the prompt, got {logits_from}")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidArgument("prompt", f"token ids must lie in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        total = prompt_len + max_tokens - 1  # the last sampled token is never fed back
        limit = self.model.config.max_position_embeddings
        if self.config.max_kv_size is None and total > limit:
            raise PromptTooLong(
                f"{len(prompt)} prompt tokens + {max_tokens} to generate exceed the model's context of {limit} "
                "(shorten the prompt or max_tokens, or cap the cache with max_kv_size / --max-kv-size)"
            )
        need = self.scheduler.max_blocks(total)
        if need > self.num_blocks:
            raise PromptTooLong(
                f"{len(prompt)} prompt tokens + {max_tokens} to generate need {need * BLOCK_TOKENS} KV-cache "
                f"tokens, but the cache holds {self.kv_cache_tokens} (raise kv_cache_tokens / --kv-cache-tokens)"
            )

    def abort(self, request_id: int) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and req.finish_reason is None:
            req.finish_reason = "abort"
            self.scheduler.finish(req)
        if self.speculator is not None:
            self.speculator.forget(request_id)

    def request(self, request_id: int) -> Request:
        return self.requests[request_id]

    def release(self, request_id: int) -> None:
        """Forget a finished request (its stats and tokens)."""
        self.requests.pop(request_id, None)
        self.stats.times.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.release(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one step → what happened to each request in it. Under --ep every rank steps together while
        any has work (`peers_busy`); a rank with nothing to run lends its experts to the others' rows.
        With `overlap`, the decode step after this one is launched before this one is booked (module
        docstring); its rows of requests that this booking ends are dropped when it is booked in turn."""
        if self.lockstep:
            self.peers_busy = self.model.parallel.any_rank(self.has_unfinished)
            if not self.peers_busy:
                return []
        launched, self._ahead = self._ahead, None
        if launched is None or not launched.live():  # (every row of a step launched ahead may have ended)
            scheduled = self.scheduler.schedule()
            if not scheduled:
                if self.lockstep:
                    self.model.idle()
                return []
            plan = [_Planned(req, req.num_computed, req.num_computed + n) for req, n in scheduled]
            if self.speculator is not None:
                self.speculator.draft(plan, self.scheduler)
            launched = self._launch(plan, self._chunks(plan))
        if self.overlap:
            self._ahead = self._launch_next(launched)
        outputs = self._book(launched)
        for out in outputs:
            if out.request_id in self._inboxes:
                self._inboxes[out.request_id].append(out)
        return outputs

    def _launch(self, plan: list[_Planned], chunks: list[SeqChunk], tokens: torch.Tensor | None = None) -> _Launched:
        """Run the forward of a step and sample it on the device, its tokens on their way to the host.
        `tokens`: the chunks' (one each) as a device tensor, where the host does not know them yet."""
        self.stats.steps += 1
        rows = _token_rows(chunks, self.model.device) if self.graphs else None
        if rows is not None and self.graphs.fits(len(rows[0])):
            logits = self.graphs.run(rows[0], tokens)  # decode, verification, a draft's catch-up: short chunks
            if rows[1] is not None:
                logits = logits[rows[1]]
        else:
            batch = self._batch(chunks)
            if tokens is not None:
                batch.tokens.copy_(tokens)
            logits = self.model(batch, self.kv)
        # every row of a step launched ahead samples: its request's tokens end where it starts, once booked
        samplers = plan if tokens is not None else [p for p in plan if p.samples and not p.draft]
        sampled = self._sample(logits, samplers, drawn=int(tokens is not None)) if samplers else None
        return _Launched(plan, samplers, logits, sampled, _TokenRead(sampled) if samplers else None)

    def _launch_next(self, launched: _Launched) -> _Launched | None:
        """Launch the decode step that follows `launched` before its tokens reach the host, with its
        sampled tokens as the next inputs, where the next schedule is certain to be that step: every
        running request decodes in it (one token, no prompt chunk: a prompt's first token books at once),
        no request waits, the blocks are free (it never preempts), and nothing of the sampling needs the
        host (no penalty, constraint or scored logits). A request that `launched` ends by its length is
        left out; one that its token stops is dropped at booking. → None where not certain."""
        live = [p for p in launched.plan if p.req.finish_reason is None]
        running = self.scheduler.running
        if self.scheduler.waiting or len(live) != len(running) or len(live) > self.config.max_batch_tokens:
            return None
        for p in live:
            r = p.req
            if p.draft or not p.samples or p.end - p.start != 1 or r.logits_from is not None:
                return None
            if r.constraint is not None or r.params.repetition_penalty != 1:
                return None
        samplers = launched.samplers
        index = {id(p): i for i, p in enumerate(samplers)}
        going = [p for p in live if len(p.req.tokens) - p.req.prompt_len + 1 < p.req.max_tokens]
        need = [blocks_for(p.end + 1) - len(p.req.blocks) for p in going]
        if not going or sum(need) > self.blocks.num_available:
            return None
        for p, n in zip(going, need, strict=True):
            p.req.blocks += self.blocks.allocate(n)
        plan = [_Planned(p.req, p.end, p.end + 1) for p in going]
        chunks = []
        for i, p in enumerate(plan):
            p.first_row, p.num_rows, p.logits_start = i, 1, p.start
            chunks.append(SeqChunk((0,), p.start, p.req.blocks, p.start))  # token 0: replaced on the device
        self.stats.overlapped += 1
        rows = [index[id(p)] for p in going]
        tokens = launched.sampled
        if rows != list(range(len(samplers))):
            tokens = tokens[device_tensor(rows, torch.int64, tokens.device)]
        return self._launch(plan, chunks, tokens)

    def wait_for_peers(self) -> None:
        """Once this rank's requests are done: under --ep, keep stepping (serving the other ranks' rows)
        until no rank has work, so that every rank leaves its last collective together."""
        while self.lockstep:
            self.step()
            if not self.peers_busy:
                return

    def _book(self, launched: _Launched) -> list[StepOutput]:
        """Commit and book a launched step, skipping the rows of requests that ended since its launch.
        Requests that fed draft tokens are verified (`_book_verified`); the others sampled exactly as they
        would without a speculator."""
        logits, reading, samplers = launched.logits, launched.reading, launched.samplers
        plan = [p for p in launched.plan if p.req.finish_reason is None]
        drafted = [p for p in plan if p.draft]
        verdicts = self.speculator.verify(logits, drafted) if drafted else []  # with drafts, a second read
        for p in plan:  # the bookkeeping that needs no sampled token overlaps the read
            if not p.draft:
                self.scheduler.commit(p.req, p.end - p.start)
        for p, token in zip(samplers, reading.tokens() if reading else [], strict=True):
            p.token = token
        outputs = [self._update(p, logits) for p in plan if not p.draft]
        for p, (accepted, token) in zip(drafted, verdicts, strict=True):
            outputs += self._book_verified(p, logits, [*p.draft[:accepted], token])
        if self.speculator is not None:
            for p in samplers + drafted:
                self.speculator.advance(p.req)
        return outputs

    def _book_verified(self, p: _Planned, logits: torch.Tensor, tokens: list[int]) -> list[StepOutput]:
        """Book a request that fed draft tokens: it commits `tokens` (the accepted drafts and the target's
        next token) up to the one that ends it, one output per token, and keeps no key or block of a
        rejected draft. A scoring request's first output carries its rows up to the verified ones, each
        later output the row that predicted its token."""
        req = p.req
        kept = self._until_finish(req, tokens)
        req.tokens.extend(kept)
        self.scheduler.commit(req, p.end - p.start + len(kept) - 1)  # the last token's keys are not computed
        self.scheduler.truncate(req, len(req.tokens))
        self.stats.computed_tokens += p.end - p.start + len(p.draft)
        self._note_tokens(req, len(kept))
        head = p.num_rows - len(p.draft)  # rows up to and including the one that predicts the first token
        outputs = []
        for i, token in enumerate(kept):
            first, rows = (p.first_row, head) if i == 0 else (p.first_row + head + i - 1, 1)
            scores = logits[first : first + rows] if req.logits_from is not None else None
            finish = req.finish_reason if i == len(kept) - 1 else None
            outputs.append(StepOutput(req.id, token, finish, scores, p.logits_start + first - p.first_row))
        return outputs

    def _until_finish(self, req: Request, tokens: list[int]) -> list[int]:
        """`tokens` up to the first that ends `req` (a stop token, or its max_tokens-th)."""
        room = req.max_tokens - len(req.output)
        for i, token in enumerate(tokens[:room]):
            if token in req.stop:
                return tokens[: i + 1]
        return tokens[:room]

    def _note_tokens(self, req: Request, count: int) -> None:
        """Times and counts for the `count` tokens just appended to `req`; it finishes if the last ends it."""
        times, now = self.stats.times[req.id], time.perf_counter()
        times.first_token = times.first_token or now
        times.last_token = now
        self.stats.generated_tokens += count
        req.finish_reason = _finish_reason(req, req.tokens[-1])
        if req.finish_reason:
            self.scheduler.finish(req)

    def stream(self, request_id: int) -> Iterator[StepOutput]:
        """The outputs of one request, stepping the engine as needed. From this call on, outputs of the
        request that another stream's step produces wait in its inbox, so several streams may be consumed
        in any interleaving."""
        inbox = self._inboxes.setdefault(request_id, deque())
        return self._drain(request_id, inbox)

    def _drain(self, request_id: int, inbox: deque[StepOutput]) -> Iterator[StepOutput]:
        try:
            while True:
                while inbox:
                    out = inbox.popleft()
                    yield out
                    if out.finish_reason:
                        return
                req = self.requests.get(request_id)
                if req is None or req.finish_reason or not self.step():
                    return
        finally:
            self._inboxes.pop(request_id, None)

    def _chunks(self, plan: list[_Planned]) -> list[SeqChunk]:
        """What the step computes of each request; notes where each request's logits rows fall."""
        chunks, row = [], 0
        for p in plan:
            req = p.req
            first = p.end - 1 if p.samples else None
            if req.logits_from is not None and p.end > req.logits_from:
                first = max(req.logits_from, p.start)
            if first is not None:
                p.first_row, p.num_rows, p.logits_start = row, p.end + len(p.draft) - first, first
                row += p.num_rows
            chunks.append(SeqChunk(req.tokens[p.start : p.end] + p.draft, p.start, req.blocks, first))
        return chunks

    def _batch(self, chunks: list[SeqChunk]) -> Batch:
        return Batch.build(chunks, device=self.model.device, max_kv_size=self.config.max_kv_size)

    def _sample(self, logits: torch.Tensor, plan: list[_Planned], drawn: int = 0) -> torch.Tensor:
        """(B,) one token per request that samples, from the last of its logits rows; `drawn`: tokens of
        each drawn but not yet booked (the sampling counter counts them)."""
        device, reqs = logits.device, [p.req for p in plan]

        def tensor(values: list[int]) -> torch.Tensor:
            return device_tensor(values, torch.int64, device)

        rows = [p.first_row + p.num_rows - 1 for p in plan]
        # consecutive rows (every decode step) are a view, not a gather
        last = logits[rows[0] : rows[0] + len(rows)] if rows == list(range(rows[0], rows[0] + len(rows))) else None
        recent = _recent(reqs, device)
        constrained = [(i, r.constraint, not r.params.greedy) for i, r in enumerate(reqs) if r.constraint is not None]
        if last is not None and recent is None and not constrained and all(r.params.greedy for r in reqs):
            return last.argmax(-1)  # what `sample` does for greedy rows, without its per-row parameter copies
        last = logits[tensor(rows)] if last is None else last
        params = SamplingBatch.from_params([r.params for r in reqs], device)
        seeds, counters = tensor([r.seed for r in reqs]), tensor([len(r.output) + drawn for r in reqs])
        if constrained:  # the host picks these rows' tokens (a sync, in constrained steps only)
            keys = ranking_keys(last, params, seeds=seeds, counters=counters, recent=recent)
            tokens = keys.argmax(-1)
            for row, token in constrained_choice(keys, last, constrained).items():
                tokens[row] = token
            return tokens
        return sample(last, params, seeds=seeds, counters=counters, recent=recent)

    def _update(self, p: _Planned, logits: torch.Tensor) -> StepOutput:
        """Book the step for one request (its positions are committed): the sampled token, stop or length."""
        req = p.req
        self.stats.computed_tokens += p.end - p.start
        wanted = req.logits_from is not None and p.num_rows
        scores = logits[p.first_row : p.first_row + p.num_rows] if wanted else None
        if p.token is not None:
            req.tokens.append(p.token)
            if req.constraint is not None:
                req.constraint.advance(p.token)
            self._note_tokens(req, 1)
        return StepOutput(req.id, p.token, req.finish_reason, scores, p.logits_start)


class _TokenRead:
    """The sampled tokens on their way to the host. On CUDA the copy goes to pinned memory without
    blocking, so the host can book the step while it lands; `tokens` waits for it."""

    def __init__(self, sampled: torch.Tensor) -> None:
        self.sampled, self.done = sampled, None
        if sampled.device.type == "cuda":
            self.sampled = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            self.sampled.copy_(sampled, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.sampled.tolist()


@dataclass(eq=False)
class _Launched:
    """A step whose forward and sampling are queued on the device: its plan, the rows that sample, its
    logits, their sampled tokens (device) and the tokens' copy to the host."""

    plan: list[_Planned]
    samplers: list[_Planned]
    logits: torch.Tensor
    sampled: torch.Tensor | None
    reading: _TokenRead | None

    def live(self) -> bool:
        return any(p.req.finish_reason is None for p in self.plan)


@dataclass(eq=False)
class _Planned:
    """One scheduled request in the step being built."""

    req: Request
    start: int  # positions start .. end of the request are computed in this step
    end: int
    token: int | None = None
    first_row: int = 0  # its logits rows in the step's output, and the position of the first one
    num_rows: int = 0
    logits_start: int = 0
    draft: list[int] = field(default_factory=list)  # draft tokens fed after `end` (engine/speculative.py)
    draft_probs: torch.Tensor | None = None  # (len(draft), V) what they were drawn from; None: point masses

    @property
    def samples(self) -> bool:
        return self.end == len(self.req.tokens)


def _token_rows(chunks: list[SeqChunk], device: torch.device) -> tuple[list[SeqChunk], torch.Tensor | None] | None:
    """A step of short chunks (a decode step; a verification: the last token and its drafts; a draft
    model catching up; a prompt whose rows attend to few keys) as one-token rows, one per token, that a
    decode graph replays, with the indices of the rows whose logits the step wants (None: all of them);
    None for a step with a longer chunk. Row i of a chunk sees keys up to its own position (its length is
    position + 1), which is the causal mask, and a step writes all its keys before any layer attends, so
    the rows of one sequence see each other's keys as one multi-token chunk would.

    Why prompts too: launched eagerly, any step costs the Python launches of a whole forward (≈ 28 ms for
    gpt-oss-20b on the H200, benchmarks/RESULTS.md), more than the GPU time of a short prompt; replayed,
    it costs the GPU time. The price is attention: each row reads its own prefix with the decode kernel,
    start + i + 1 keys for row i, where the flash prefill reads the chunk's keys once per query tile —
    hence the ROW_KEYS bound on their sum (a whole first chunk of PREFILL_CHUNK_TOKENS passes)."""
    if not all(len(c.tokens) <= GRAPH_CHUNK_TOKENS or _row_keys(c) <= ROW_KEYS for c in chunks):
        return None
    if all(len(c.tokens) == 1 and c.logits_from == c.start for c in chunks):
        return chunks, None  # a plain decode step: the chunks are the rows
    rows: list[SeqChunk] = []
    wanted: list[int] = []
    for c in chunks:
        for i, token in enumerate(c.tokens):
            if c.logits_from is not None and c.start + i >= c.logits_from:
                wanted.append(len(rows))
            rows.append(SeqChunk((token,), c.start + i, c.block_table))
    return rows, None if len(wanted) == len(rows) else device_tensor(wanted, torch.int64, device)


def _row_keys(chunk: SeqChunk) -> int:
    """The keys a chunk's one-token rows attend to in all: Σ over its rows of position + 1."""
    n = len(chunk.tokens)
    return n * chunk.start + n * (n + 1) // 2


def _finish_reason(req: Request, token: int) -> str | None:
    """Why `req` ends with `token` just appended, or None."""
    if token in req.stop:
        return "stop"
    return "length" if len(req.output) >= req.max_tokens else None


def _recent(reqs: list[Request], device: torch.device) -> torch.Tensor | None:
    """(B, R) the last tokens each penalized request looks at, oldest first, −1 padded; None: no penalty."""
    width = max((r.params.repetition_context for r in reqs if r.params.repetition_penalty != 1), default=0)
    if width == 0:
        return None
    rows = [([-1] * width + r.tokens[-width:])[-width:] for r in reqs]
    return device_tensor(rows, torch.int64, device)


@torch.inference_mode()
def forward_full(model: GptOss, ids: torch.Tensor, *, max_kv_size: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) float32 of every position of B sequences `ids` (B, T) run from position 0 in one
    step, in a pool made for them: the whole-model forward the oracle tests compare."""
    B, T = ids.shape
    per_seq = blocks_for(T)
    kv = KVPool.allocate(model.config, num_blocks=B * per_seq, dtype=model.dtype, device=model.device)
    rows = ids.tolist()
    chunks = [SeqChunk(rows[b], 0, range(b * per_seq, (b + 1) * per_seq), 0) for b in range(B)]
    return model(Batch.build(chunks, device=model.device, max_kv_size=max_kv_size), kv).view(B, T, -1)
