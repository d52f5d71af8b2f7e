"""The engine thread: one thread owns the engine and steps it while any request runs.

The engine (engine/engine.py) is synchronous and not thread-safe, so nothing else touches it. Request
handlers on the asyncio loop `submit` a `Job` and may `cancel` it; both go through a thread-safe queue
that the thread drains between steps, so a cancelled request's blocks are free before the next step
runs. Each step's results go back to the loop in one `call_soon_threadsafe`, onto every job's
`asyncio.Queue`: first `Accepted` (or `Failed`, when the engine refuses the request), then one `Token`
per sampled token, then `Finished`. A step that raises fails the requests in flight and the thread goes
on serving new ones.

Every call that changes the engine goes through a `Mirror` (serve/mirror.py): alone it is the engine's
own call; under `--tp` it also reaches the other ranks, so their engines step alike. There a failed step
is fatal instead: the ranks may no longer agree, so the thread fails what runs, records the error
(`error`) and ends, and the server stops (serve/app.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ossq.engine.constrain import Constraint
from ossq.engine.engine import Engine, StepOutput
from ossq.engine.parallel import ParallelError
from ossq.engine.sampling import SamplingParams
from ossq.engine.speculative import SpecStats
from ossq.errors import OssqError
from ossq.serve.mirror import Mirror

log = logging.getLogger("ossq.serve")


@dataclass(frozen=True)
class Logprob:
    """The log-probability (natural log, of the model's raw distribution) of a generated token, and the
    `top` most likely tokens at its position as (token id, logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Accepted:
    request_id: int


@dataclass(frozen=True)
class Token:
    token: int
    logprob: Logprob | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at the request's last admission


@dataclass(frozen=True)
class Finished:
    reason: str  # the engine's: "stop" (a stop token), "length" or "abort" (the server stopped)
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Failed:
    error: Exception  # an OssqError for a request the engine refused; anything else is the server's fault


Event = Accepted | Token | Finished | Failed


@dataclass(eq=False)
class Job:
    """One generation, as the handler submits it. `top_logprobs`: None for no logprobs, else how many
    alternatives to report beside each generated token's own logprob. `events` is made on the loop."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: frozenset[int]
    top_logprobs: int | None = None
    constraint: Constraint | None = None  # response_format's JSON (engine/constrain.py)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    request_id: int | None = None  # the engine's id, set by the thread


@dataclass
class WorkerStats:
    """Totals since start and the engine's state after the last step or queue change. Written by the
    engine thread only; read by /metrics."""

    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by reason: stop, length, cancelled, error
    speculation: SpecStats | None = None  # the speculator's running totals, when the engine speculates

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @classmethod
    def total(cls, stats: Sequence[WorkerStats]) -> WorkerStats:
        """Several engine threads' stats summed field by field (`--dp` replicas)."""
        out = cls()
        for s in stats:
            for f in dataclasses.fields(cls):
                setattr(out, f.name, _add(getattr(out, f.name), getattr(s, f.name)))
        return out


def _add(a: Any, b: Any) -> Any:
    """a + b for the kinds of WorkerStats' fields: numbers, counts by key, speculation totals (None: none)."""
    if b is None:
        return a
    if isinstance(b, dict):
        return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}
    if isinstance(b, SpecStats):
        return SpecStats(*(getattr(a, f.name, 0) + getattr(b, f.name) for f in dataclasses.fields(SpecStats)))
    return a + b


class EngineWorker:
    """The engine thread. It reads `engine` directly and changes it only through `mirror` (by default
    the engine alone)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, mirror: Mirror | None = None) -> None:
        self.engine, self.loop = engine, loop
        self.mirror = mirror or Mirror(engine)
        self.error: ParallelError | None = None  # why the thread stopped serving by itself (--tp only)
        spec = engine.speculator.stats if engine.speculator is not None else None
        self.stats = WorkerStats(blocks_total=engine.num_blocks, speculation=spec)
        self._inbox: queue.SimpleQueue[tuple[str, Job | None]] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._outbox: list[tuple[Job, Event]] = []
        self._thread = threading.Thread(target=self._run, name="ossq-engine", daemon=True)

    # ---- the loop's side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        """Abort the job's request; its blocks are released before the engine's next step."""
        self._inbox.put(("cancel", job))

    def stop(self, timeout: float | None = None) -> None:
        """Abort what still runs (its handlers get `Finished("abort")`) and end the thread; again: no-op."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the engine thread
    def _run(self) -> None:
        try:
            while self._take(block=not self.engine.has_unfinished):
                if self.engine.has_unfinished:
                    self._step()
                self._publish()
            for job in list(self._jobs.values()):
                self._finish(job, "abort")
            self._publish()
            self.mirror.close()
        except ParallelError as e:
            self._fail_all(e)

    def _fail_all(self, error: ParallelError) -> None:
        """The ranks are out of step: fail every request without touching the engine again."""
        log.error("stopping the server: %s", error)
        self.error = error
        self.stats.finished["error"] = self.stats.finished.get("error", 0) + len(self._jobs)
        self._outbox.extend((job, Failed(error)) for job in self._jobs.values())
        self._jobs.clear()
        self._publish()

    def _take(self, *, block: bool) -> bool:
        """Handle what the queue holds (waiting for something when `block`) → False on stop."""
        try:
            kind, job = self._inbox.get(block=block)
            while True:
                if kind == "stop":
                    return False
                self._add(job) if kind == "add" else self._cancel(job)
                kind, job = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _add(self, job: Job) -> None:
        logits_from = len(job.prompt) - 1 if job.top_logprobs is not None and job.prompt else None
        try:
            rid = self.mirror.add_request(
                job.prompt,
                job.params,
                max_tokens=job.max_tokens,
                stop=job.stop,
                logits_from=logits_from,
                constraint=job.constraint,
            )
        except OssqError as e:
            self._outbox.append((job, Failed(e)))
            return
        job.request_id = rid
        self._jobs[rid] = job
        self._outbox.append((job, Accepted(rid)))

    def _cancel(self, job: Job) -> None:
        if job.request_id in self._jobs:
            self._finish(job, "cancelled", notify=False)

    def _step(self) -> None:
        try:
            outputs = self.mirror.step()
        except ParallelError:
            raise  # under --tp: fatal (`_run`)
        except Exception as e:  # a bug or an out-of-memory: fail what was running, keep serving
            log.exception("an engine step failed; failing the %d requests in flight", len(self._jobs))
            for job in list(self._jobs.values()):
                self._finish(job, "error", notify=False)
                self._outbox.append((job, Failed(e)))
            return
        self.stats.steps += 1
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None:
                continue
            if out.token is not None:
                self.stats.generated_tokens += 1
                cached = self.engine.requests[out.request_id].cached_tokens
                self._outbox.append((job, Token(out.token, _logprob(out, job.top_logprobs), cached)))
            if out.finish_reason:
                self._finish(job, out.finish_reason)

    def _finish(self, job: Job, reason: str, *, notify: bool = True) -> None:
        """Take the job's request out of the engine (freeing its blocks) and count it."""
        req = self.engine.requests.get(job.request_id)
        prompt, cached = (req.prompt_len, req.cached_tokens) if req is not None else (len(job.prompt), 0)
        self.mirror.abort(job.request_id)
        self.mirror.release(job.request_id)
        del self._jobs[job.request_id]
        self.stats.prompt_tokens += prompt
        self.stats.cached_tokens += cached
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if notify:
            self._outbox.append((job, Finished(reason, prompt, cached)))

    def _publish(self) -> None:
        """Hand the events gathered since the last call to the loop, and refresh the gauges."""
        s, scheduler = self.stats, self.engine.scheduler
        s.running, s.waiting, s.blocks_used = (
            len(scheduler.running),
            len(scheduler.waiting),
            self.engine.blocks.num_used,
        )
        if self._outbox:
            events, self._outbox = self._outbox, []
            try:
                self.loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


@torch.inference_mode()
def _logprob(out: StepOutput, top: int | None) -> Logprob | None:
    """The sampled token's logprob from the last logits row of the step (the row that predicted it)."""
    if top is None or out.logits is None or not len(out.logits):
        return None
    logprobs = torch.log_softmax(out.logits[-1].float(), dim=-1)
    alternatives = ()
    if top > 0:
        values, ids = logprobs.topk(top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Logprob(out.token, logprobs[out.token].item(), alternatives)
