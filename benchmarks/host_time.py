"""How much of an engine step is the host's own work: the wall time of decode steps against the time of
their forwards, by batch size, with the overlap of engine/engine.py on and off.

    python benchmarks/host_time.py [--preset tiny] [--device cpu|cuda] [--batch 1,16,64] [--steps 200]
        [--json OUT.json]

The model is drawn in memory (ossq.synth.random_quantized_model, MXFP4 experts + 4-bit g64 rest); every
request decodes greedily with no stop, so each measured step is a decode step of the whole batch. With
the overlap off, the forward is timed around `GptOss.forward` (eager steps) or `DecodeGraphs.run`
(replayed ones) between device syncs, so "outside" is the engine's own work: scheduling, building inputs,
sampling, booking — the time the device idles every step. With it on, only the step's wall time is
taken (a sync would undo the overlap): the host's work then runs while the device computes the next
step, so on CUDA the step approaches the forward's time; on a CPU, which computes the forward itself,
nothing can overlap.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from ossq.bench import parse_lengths
from ossq.device import resolve_device
from ossq.engine.engine import Engine, EngineConfig
from ossq.quant.recipe import experts_mxfp4
from ossq.synth import random_quantized_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, total: list[float], device: torch.device) -> Callable:
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        total[0] += time.perf_counter() - start
        return out

    return wrapper


def measure(model, batch: int, steps: int, overlap: bool) -> dict[str, float]:
    device = model.device
    engine = Engine(model, EngineConfig(kv_cache_tokens=batch * 1024, max_num_seqs=batch, overlap=overlap))
    for i in range(batch):
        engine.add_request([(37 * i + j) % 500 + 10 for j in range(20)], max_tokens=steps + 40)
    for _ in range(20):  # prefill and warm-up (graph capture)
        engine.step()
    forward = [0.0]
    if not overlap:
        if engine.graphs is not None:
            engine.graphs.run = _timed(engine.graphs.run, forward, device)
        model.forward = _timed(model.forward, forward, device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    wall = time.perf_counter() - start
    row = {"batch": batch, "overlap": overlap, "step_us": wall / steps * 1e6}
    row["overlapped_steps"] = engine.stats.overlapped
    if not overlap:
        del model.forward  # the instance attribute set above: back to the class's method
        row["forward_us"] = forward[0] / steps * 1e6
        row["outside_us"] = row["step_us"] - row["forward_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "20b"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    model = random_quantized_model(args.preset, experts_mxfp4(4, 64), device=str(device))
    rows = []
    print("| batch | overlap | step µs | forward µs | outside µs | overlapped steps |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in parse_lengths(args.batch):
            for overlap in (False, True):
                r = measure(model, batch, args.steps, overlap)
                rows.append(r)
                fwd, out = (f"{r['forward_us']:.0f}", f"{r['outside_us']:.0f}") if "forward_us" in r else ("", "")
                print(f"| {batch} | {'on' if overlap else 'off'} | {r['step_us']:.0f} | {fwd} | {out} | "
                      f"{r['overlapped_steps']} |")  # fmt: skip
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": str(device), "preset": args.preset, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
