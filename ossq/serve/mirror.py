"""`ossq serve --tp N`: every rank's engine runs the same steps on the same requests, so the collectives
inside the forward line up (engine/parallel.py), while only rank 0 serves HTTP.

Rank 0's worker (serve/worker.py) changes its engine only through a `Mirror`: each call that changes the
engine's state — add_request (with all its arguments), abort, release, step — is applied on rank 0 at
once and recorded, and each step first sends the calls recorded since the last one, then itself, to the
other ranks in one broadcast over a gloo group of its own. Ranks ≠ 0 run `follow`, which replays them in
the same order: the same requests get the same ids (the engine counts them), the same steps schedule
the same batches. A request without a seed gets rank 0's random one in its call, as `Parallel.sampling`
gives one to generate. With one rank a Mirror is the engine's own calls and nothing else.

Idle, nothing is sent: rank 0's worker waits on its queue and the followers in the receive. So the
control group's timeout is a year (`IDLE_TIMEOUT`) rather than a heartbeat that would wake every rank
for nothing; a dead rank is noticed at once anyway — the launcher sees the process end
(engine/launch.py) and a peer's send or receive fails when the connection closes. The forward's own
collectives keep the launcher's timeout, so a rank stuck in a step still fails the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import signal
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from ossq.engine.constrain import Constraint
from ossq.engine.engine import Engine, StepOutput
from ossq.engine.parallel import SINGLE, Parallel, ParallelError
from ossq.engine.sampling import SamplingParams, random_seed
from ossq.tokenizer import Tokenizer

IDLE_TIMEOUT = datetime.timedelta(days=365)  # how long a follower waits for rank 0's next command


@dataclass(frozen=True)
class _Call:
    """`engine.<name>(*args, **kwargs)`, to replay on a follower; `result`: the id rank 0's add_request
    returned, which the follower's must equal."""

    name: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: int | None = None


class Mirror:
    """The engine calls that change its state, as the serve worker makes them (module docstring). Made on
    rank 0 together with the followers' `follow` (both create the control group); used by one thread."""

    def __init__(self, engine: Engine, parallel: Parallel = SINGLE) -> None:
        self.engine = engine
        self._group = _control_group() if parallel.active else None
        self._pending: list[_Call] = []

    def add_request(self, prompt: list[int], params: SamplingParams, **options: Any) -> int:
        """The engine's add_request; a refused request (an OssqError) is not sent: it changed nothing."""
        if self._group is not None and params.seed is None:
            params = dataclasses.replace(params, seed=random_seed())  # one draw, for every rank
        rid = self.engine.add_request(prompt, params, **options)
        if self._group is not None:
            options["constraint"] = _Detached.of(options.get("constraint"))
            self._pending.append(_Call("add_request", (prompt, params), options, rid))
        return rid

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)
        self._record("abort", request_id)

    def release(self, request_id: int) -> None:
        self.engine.release(request_id)
        self._record("release", request_id)

    def step(self) -> list[StepOutput]:
        """The engine's step, after the followers were sent it. Under --tp any failure is a ParallelError:
        once one rank's step failed, no rank can be known to hold what the others hold."""
        if self._group is None:
            return self.engine.step()
        self._send([*self._pending, _Call("step")])
        try:
            return self.engine.step()
        except Exception as e:
            raise ParallelError(f"an engine step failed on rank 0 ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        """Tell the followers to stop (their `follow` returns); nothing is sent after it."""
        if self._group is not None:
            self._send([_Call("stop")])
            self._group = None

    def _record(self, name: str, *args: Any) -> None:
        if self._group is not None:
            self._pending.append(_Call(name, args))

    def _send(self, calls: list[_Call]) -> None:
        self._pending = []
        try:
            dist.broadcast_object_list([calls], src=0, group=self._group)
        except Exception as e:  # a rank died or left: its connection closed
            raise ParallelError(f"rank 0 lost the other ranks ({type(e).__name__}: {e})") from e


def follow(engine: Engine, tokenizer: Tokenizer, parallel: Parallel) -> None:
    """A rank ≠ 0 serving: replay rank 0's engine calls until it says stop. SIGINT is ignored here: a
    terminal's Ctrl-C reaches every rank, and only rank 0 acts on it (it drains its requests, then stops
    these). `tokenizer` gives constraints back their token bytes (`_Detached`)."""
    with contextlib.suppress(ValueError):  # not the main thread: the signal is not ours to set
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = _control_group()
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        for call in box[0]:
            if call.name == "stop":
                return
            _replay(engine, tokenizer, call, parallel)


def _replay(engine: Engine, tokenizer: Tokenizer, call: _Call, parallel: Parallel) -> None:
    if call.name != "add_request":
        getattr(engine, call.name)(*call.args, **call.kwargs)
        return
    options = dict(call.kwargs)
    if isinstance(options["constraint"], _Detached):
        options["constraint"] = options["constraint"].attach(tokenizer)
    try:
        rid = engine.add_request(*call.args, **options)
    except Exception as e:
        raise ParallelError(f"rank {parallel.rank} refused request {call.result}, which rank 0 accepted: {e}") from e
    if rid != call.result:
        raise ParallelError(f"rank {parallel.rank} numbered request {call.result} as {rid}: the ranks are out of step")


def _control_group() -> Any:
    """A gloo group over every rank for the commands (CPU objects, whatever the forward's backend), with
    the idle timeout; collective: rank 0's Mirror and each follower create it at the same point."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


@dataclass(frozen=True)
class _Detached:
    """A constraint on its way to the followers, without its `token_bytes`: that is its tokenizer's bound
    method, and pickling it would copy the whole vocabulary with every request. The follower's own
    tokenizer (the same checkpoint's) puts it back."""

    cls: type
    state: dict[str, Any]

    @classmethod
    def of(cls, constraint: Constraint | None) -> _Detached | Constraint | None:
        if constraint is None or "token_bytes" not in vars(constraint):
            return constraint
        state = dict(vars(constraint))
        del state["token_bytes"]
        return cls(type(constraint), state)

    def attach(self, tokenizer: Tokenizer) -> Constraint:
        constraint = self.cls.__new__(self.cls)
        vars(constraint).update(self.state, token_bytes=tokenizer.token_bytes)
        return constraint
