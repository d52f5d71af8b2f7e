"""Starting the ranks of `--tp N`: one process per rank over torch.distributed (NCCL, one GPU each, on
CUDA; gloo on the CPU), or the processes `torchrun` started.

Every rank runs the same function on the same arguments (the same requests, seeds and scheduling,
engine/parallel.py); rank 0 alone prints, the others write to /dev/null, and their errors come back here
through files. A rank that raises or dies ends the run at once: the parent sees it, stops the others and
raises a ParallelError naming the rank (or re-raises the rank's own OssqError). A rank stuck in a
collective (its peer hung, or never arrived) fails after `timeout_s`, the process group's timeout.
A Ctrl-C or SIGTERM stops every rank at once, unless the run is `graceful` (a server): then rank 0 is
asked to stop and to stop the others itself (`_stopping_rank_0`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException

from ossq.device import resolve_device
from ossq.engine.parallel import SINGLE, Parallel, ParallelError
from ossq.errors import DeviceError, InvalidArgument, OssqError

DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for its peers (loading 120b takes minutes)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launch(
    fn: Callable[..., Any],
    *args: Any,
    tp: int = 1,
    device: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    graceful: bool = False,
) -> Any:
    """Run `fn(parallel, *args)` on `tp` ranks → rank 0's return value (None on the other ranks under
    torchrun). With tp 1 and no torchrun, `fn(SINGLE, *args)` here, with no process group at all. `fn` and
    `args` must be picklable (a module-level function) to reach spawned ranks. `graceful`: a SIGINT or
    SIGTERM here reaches rank 0 only, as a SIGTERM, for `fn` to end the run in order (module docstring)."""
    if tp < 1:
        raise InvalidArgument("tp", f"tp must be at least 1, got {tp}")
    if all(v in os.environ for v in TORCHRUN_VARS):
        return _run_under_torchrun(fn, args, tp=tp, device=device, timeout_s=timeout_s)
    if tp == 1:
        return fn(SINGLE, *args)
    device_type = _device_type(device, tp)
    with tempfile.TemporaryDirectory(prefix="ossq-tp-") as tmp:
        work = Path(tmp)
        ctx = mp.start_processes(
            _rank_main,
            args=(fn, args, tp, device_type, work, timeout_s),
            nprocs=tp,
            join=False,
            start_method="spawn",
        )
        stopping = _stopping_rank_0(ctx) if graceful else contextlib.nullcontext()
        try:
            with _quiet_spawn_log(), stopping:
                while not ctx.join():
                    pass
        except ProcessException as e:
            raise _rank_error(e, ctx, work) from None
        except BaseException:  # Ctrl-C or a signal here: no rank outlives the command
            _stop(ctx)
            raise
        result = work / "result"
        return pickle.loads(result.read_bytes()) if result.exists() else None


def _device_type(device: str | None, tp: int) -> str:
    """cpu or cuda; on CUDA there must be a GPU per rank."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise DeviceError(f"--tp {tp} places rank i on cuda:i; pass --device cuda, not {device}")
        count = torch.cuda.device_count()
        if count < tp:
            raise DeviceError(f"--tp {tp} needs {tp} GPUs, one per rank, but this machine has {count}")
    elif dev.type != "cpu":
        raise DeviceError(f"--tp runs on cuda or cpu, not {dev.type}")
    return dev.type


def _init(rank: int, world_size: int, device_type: str, local_rank: int, timeout_s: float, **init: Any) -> Parallel:
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **init,
    )
    return Parallel(rank=rank, world_size=world_size, device=device)


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple, tp: int, device_type: str, work: Path, timeout_s: float):
    """One spawned rank: join the group through a file store, run `fn`, hand back its result or error."""
    if rank:
        _silence()
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))  # the ranks share the cores
    try:
        parallel = _init(rank, tp, device_type, rank, timeout_s, init_method=f"file://{work / 'store'}")
        result = fn(parallel, *args)
        if rank == 0:
            (work / "result").write_bytes(pickle.dumps(result))
    except BaseException as e:
        (work / f"error-{rank}").write_bytes(_pickled_error(e))
        _claim_first(work, rank)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_under_torchrun(fn: Callable[..., Any], args: tuple, *, tp: int, device: str | None, timeout_s: float):
    rank, world_size, local_rank = (int(os.environ[v]) for v in TORCHRUN_VARS)
    if world_size != tp:
        raise ParallelError(f"torchrun started {world_size} processes but --tp is {tp}; pass --tp {world_size}")
    if rank:
        _silence()
    parallel = _init(rank, world_size, resolve_device(device).type, local_rank, timeout_s)
    try:
        result = fn(parallel, *args)
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


def _stop(ctx: ProcessContext, grace_s: float = 5.0) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(grace_s)
        if p.is_alive():
            p.kill()


@contextlib.contextmanager
def _stopping_rank_0(ctx: ProcessContext):
    """While the ranks run, the first SIGINT or SIGTERM sends rank 0 a SIGTERM (a server drains its
    requests, then stops its followers) and the wait goes on; a second one raises KeyboardInterrupt, which
    stops every rank. If the ranks then fail, the first signal is raised again once the handlers before
    ours are back, so the run ends as interrupted, not as a rank's error."""
    caught: list[int] = []

    def handler(signum: int, _frame) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        ctx.processes[0].terminate()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except ProcessException:
        if not caught:
            raise
        _restore(previous)
        signal.raise_signal(caught[0])
        raise
    finally:
        _restore(previous)


def _restore(handlers: dict[int, Any]) -> None:
    for sig, old in handlers.items():
        signal.signal(sig, old)


@contextlib.contextmanager
def _quiet_spawn_log():
    """torch logs a warning for every rank the join stops after a failure; the error we raise says it."""
    logger = logging.getLogger("torch.multiprocessing.spawn")
    level, logger.level = logger.level, logging.ERROR
    try:
        yield
    finally:
        logger.setLevel(level)


def _silence() -> None:
    devnull = open(os.devnull, "w")  # noqa: SIM115 (the process's streams, for its whole life)
    sys.stdout = sys.stderr = devnull


def _pickled_error(e: BaseException) -> bytes:
    """`e` as bytes that `_unpickled_error` turns back into the same type, message and attributes, even
    for a type whose __init__ takes other arguments than its message (InvalidArgument)."""
    try:
        return pickle.dumps((type(e), e.args, vars(e)))
    except Exception:  # an exception that cannot travel: its type and message can
        return pickle.dumps((ParallelError, (f"{type(e).__name__}: {e}",), {}))


def _unpickled_error(data: bytes) -> BaseException:
    cls, args, state = pickle.loads(data)
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(state)
    return error


def _rank_error(e: ProcessException, ctx: ProcessContext, work: Path) -> OssqError:
    """The run's failure as one error, naming its cause: a rank that died without a word (its peers'
    errors, a connection closed in a collective, follow from it), else the first rank that raised (its
    own OssqError, or a ParallelError that says what it raised)."""
    n = len(ctx.processes)
    died = [i for i, p in enumerate(ctx.processes) if p.exitcode not in STOPPED and not _error_file(work, i)]
    if not _error_file(work, e.error_index) and e.error_index not in died:
        died.insert(0, e.error_index)
    if died:
        return ParallelError(f"rank {died[0]} of {n} died ({_how(ctx.processes[died[0]].exitcode)})")
    first = work / "first"
    rank = int(first.read_text()) if first.exists() else e.error_index
    error = _unpickled_error((work / f"error-{rank}").read_bytes())
    if isinstance(error, OssqError):
        return error
    return ParallelError(f"rank {rank} of {n} failed: {type(error).__name__}: {error}")


STOPPED = (None, 0, 1, -signal.SIGTERM, -signal.SIGKILL)  # running, done, raised, or stopped by the join


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit code {exitcode}"


def _claim_first(work: Path, rank: int) -> None:
    """Mark `rank` as the first to fail, unless another was: later failures are usually its echo."""
    with contextlib.suppress(FileExistsError), (work / "first").open("x") as f:
        f.write(str(rank))


def _error_file(work: Path, rank: int) -> Path | None:
    path = work / f"error-{rank}"
    with contextlib.suppress(OSError):
        if path.stat().st_size:
            return path
    return None
