"""Where a batch-1 decode step's time goes on the GPU: per-kernel times, launches per step, and the time
outside the kernels, eager and graph-replayed.

    python benchmarks/profile_decode.py -m CHECKPOINT [--context 90] [--steps 50] [--json OUT.json]

It prints (and writes as JSON) four figures per step — the engine step with graphs (what a user gets),
one bare graph replay timed by CUDA events (the GPU's own time), the eager step, and the sum of the
kernels the profiler saw in eager steps — then the kernels by total time, with the bytes the step reads
at the measured copy bandwidth as the floor they are measured against, and where the host's time goes in
graphed steps (cProfile's functions by their own time; the wait for the sampled token shows as the
event's `synchronize`): what the engine step costs beyond the replay.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ossq.bench import copy_bandwidth_gbps, decode_bytes_per_token
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import load


def _prompt(n: int) -> list[int]:
    return [(1009 * i + 7) % 50000 + 100 for i in range(n)]


def _decoding_engine(model, context: int, graphs: bool) -> tuple[Engine, int]:
    """An engine with one request prefilled to `context` tokens and its first decode step run."""
    engine = Engine(model, EngineConfig(kv_cache_tokens=context + 1024, prefix_cache=False, cuda_graphs=graphs))
    rid = engine.add_request(_prompt(context), max_tokens=1000)  # more than the profiled steps
    while engine.requests[rid].num_computed < context:
        engine.step()
    engine.step()
    return engine, rid


def _step_ms(engine: Engine, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def _replay_ms(engine: Engine, steps: int) -> float:
    graph = engine.graphs.graphs[min(engine.graphs.graphs)]  # one row: the prompt's may be a larger graph
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        graph.graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / steps


def _kernels(engine: Engine, steps: int) -> dict[str, dict[str, float]]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time
            totals[event.name][1] += 1
    return {
        name: {"us_per_step": t / steps, "launches_per_step": n / steps}
        for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])
    }


def _host(engine: Engine, steps: int, top: int = 25) -> list[dict[str, float | str]]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) → (calls, primitive calls, own s, cumulative s, …)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {"function": f"{name} ({file.rsplit('/', 1)[-1]}:{line})", "calls_per_step": calls / steps,
         "own_us_per_step": own / steps * 1e6, "cumulative_us_per_step": cum / steps * 1e6}
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--context", type=int, default=90)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ops", default="triton")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    model, _ = load(args.model, device="cuda", ops=args.ops)
    with torch.inference_mode():
        graphed, _ = _decoding_engine(model, args.context, graphs=True)
        _step_ms(graphed, 5)
        result = {"graph_step_ms": _step_ms(graphed, args.steps), "graph_replay_ms": _replay_ms(graphed, args.steps)}
        host = _host(graphed, args.steps)
        del graphed
        eager, _ = _decoding_engine(model, args.context, graphs=False)
        _step_ms(eager, 5)
        result["eager_step_ms"] = _step_ms(eager, args.steps)
        kernels = _kernels(eager, 10)
    result["kernel_sum_ms"] = sum(k["us_per_step"] for k in kernels.values()) / 1e3
    result["launches_per_step"] = sum(k["launches_per_step"] for k in kernels.values())
    gbps = copy_bandwidth_gbps(torch.device("cuda"))
    result["bytes_per_token"] = decode_bytes_per_token(model, args.context)
    result["copy_bandwidth_gbps"] = gbps
    result["bandwidth_floor_ms"] = result["bytes_per_token"] / (gbps * 1e9) * 1e3
    result["kernels"] = kernels
    result["host"] = host
    for key, value in result.items():
        if key not in ("kernels", "host"):
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"{'us/step':>10} {'launches':>9}  kernel")
    for name, k in list(kernels.items())[:30]:
        print(f"{k['us_per_step']:10.1f} {k['launches_per_step']:9.1f}  {name[:110]}")
    print(f"{'own us':>8} {'cum us':>8} {'calls':>6}  host function (graphed steps, per step)")
    for h in host:
        own, cum, calls = h["own_us_per_step"], h["cumulative_us_per_step"], h["calls_per_step"]
        print(f"{own:8.1f} {cum:8.1f} {calls:6.1f}  {h['function']}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
