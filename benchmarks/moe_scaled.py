"""MXFP4 experts through `tl.dot_scaled` against the decode in registers (ossq/engine/triton/moe.py), on one
CUDA GPU at gpt-oss-20b shapes: 32 experts, C = I = 2880, top 4, MXFP4 gate/up/down with biases, bfloat16
activations.

- the per-pair kernels (`moe.experts`, decode: 1, 2, 4, 8 tokens): the decode in registers at its default
  tiles, and `scaled` over a sweep of (block_n, block_k, num_warps, swap); each timed whole and its first
  kernel (gate/up) alone, the down kernel being the difference;
- the grouped kernels (`moe.grouped_experts`, 16, 64, 256, 2048 tokens) both ways at their default tiles.

The method is benchmarks/kernels.py's (its helpers are imported): every timing is the median over replays
of a CUDA graph that runs the operation on several distinct copies of the expert weights, each with its
own routing, so that the graph reads at least 512 MB of experts (from HBM, not the L2), divided by the
copies. GB/s counts the bytes of the distinct experts a call hits (gate + up + down weights, scales and
biases), what it must read at least; the per-pair kernels read an expert once per pair hitting it, so at
more than one token some of their reads are L2 hits. Every variant's output is checked against TorchOps'
float32 experts before it is timed (errors ‖out − ref‖/‖ref‖ and max|out − ref|/max|ref|); a variant that
fails to compile or run is reported and skipped.

    python benchmarks/moe_scaled.py --out DIR [--only decode grouped] [--dry]

writes DIR/moe_scaled.json (rewritten as it goes) and prints markdown tables. `--dry` runs every part at
tiny shapes on the CPU through Triton's interpreter, to check the script itself before a device call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels  # noqa: E402  (under --dry it sets TRITON_INTERPRET before the kernels are imported)
from kernels import BF16, DEV, DRY, REF, Log, as_float, copy_bandwidth, graph_us, nbytes, random_linear, rel_err  # noqa: E402

from ossq.engine.triton import moe  # noqa: E402
from ossq.quant.spec import QuantSpec  # noqa: E402

MXFP4 = QuantSpec(4, 32, "mxfp4")
E, C, I = (4, 64, 96) if DRY else (32, 2880, 2880)
TOP_K = 4
KW = dict(limit=7.0, alpha=1.702)
DECODE_TOKENS = (1, 2) if DRY else (1, 2, 4, 8)
GROUPED_TOKENS = (16,) if DRY else (16, 64, 256, 2048)
REGISTERS = (8, 1024, 4, False)  # moe.DECODE_TILES, 4 warps: the decode in registers as the engine runs it
SWEEP = [  # (block_n, block_k, num_warps, swap) of the dot_scaled kernels; the first is moe.SCALED_TILES
    (32, 256, 4, False),
    (16, 256, 4, False),
    (16, 128, 4, False),
    (32, 512, 8, False),
    (16, 256, 4, True),
    (32, 256, 4, True),
    (64, 256, 4, True),
    (64, 128, 4, True),
]
ROTATE_BYTES = kernels.ROTATE_BYTES
MAX_COPIES = 2 if DRY else 12
PROJ = ("gate_proj", "up_proj", "down_proj")


def expert_stack() -> SimpleNamespace:
    return SimpleNamespace(gate_proj=random_linear(MXFP4, (E,), I, C), up_proj=random_linear(MXFP4, (E,), I, C),
                           down_proj=random_linear(MXFP4, (E,), C, I))  # fmt: skip


def float_stack(st) -> SimpleNamespace:
    return SimpleNamespace(**{p: as_float(getattr(st, p)) for p in PROJ})


def routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct expert ids (N, k) per token, uniformly at random, and float32 softmax weights (N, k)."""
    gen = torch.Generator().manual_seed(seed)
    top_i = torch.rand(tokens, E, generator=gen).argsort(1)[:, :TOP_K]
    route = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), -1)
    return top_i.to(DEV), route.to(DEV)


class Case:
    """`tokens` tokens on enough copies of the experts (each with its own routing) that one graph reads at
    least ROTATE_BYTES of distinct experts; the float32 reference of copy 0."""

    def __init__(self, stacks: list, tokens: int) -> None:
        self.per_expert = [sum(nbytes(getattr(stacks[0], p)) for p in ps) / E for ps in (PROJ[:2], PROJ[2:])]
        self.x = torch.randn(tokens, C, generator=torch.Generator().manual_seed(tokens)).to(DEV, BF16)
        routes = [routing(tokens, seed=1000 * tokens + c) for c in range(len(stacks))]
        hit = [torch.unique(top_i).numel() for top_i, _ in routes]
        count = min(len(stacks), max(2, -(-ROTATE_BYTES // int(min(hit) * sum(self.per_expert)))))
        self.runs = list(zip(stacks[:count], routes[:count], strict=True))
        self.experts_hit = statistics.mean(hit[:count])
        top_i, route = routes[0]
        self.ref = REF._experts_grouped(self.x.float(), float_stack(stacks[0]), top_i, route, **KW)

    def bytes(self, part: slice = slice(None)) -> float:
        """Bytes of the distinct experts a call hits (on average over the copies), of gate/up, down or both."""
        return self.experts_hit * sum(self.per_expert[part])

    def time(self, fn) -> float:
        """Median µs of fn(x, stack, top_i, route) per copy, graph-replayed over the copies."""
        return graph_us([partial(fn, self.x, st, top_i, route) for st, (top_i, route) in self.runs])


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖out − ref‖ / ‖ref‖, max |out − ref| / max |ref|) against the float32 reference."""
    diff = (out.float() - ref).abs().max() / ref.abs().max()
    return rel_err(out, ref), diff.item()


def decode_run(x, st, top_i, route, *, tiles: tuple, first_only: bool = False):
    """moe.experts at `tiles` (scaled unless they are REGISTERS), or its gate/up kernel alone."""
    bn, bk, warps, swap = tiles
    kw = dict(block_n=bn, block_k=bk, num_warps=warps, scaled=tiles != REGISTERS, swap=swap)
    if first_only:
        return moe.experts_gate_up(x, st, top_i.reshape(-1), TOP_K, **KW, **kw)
    return moe.experts(x, st, top_i, route, **KW, **kw)


def decode_bench(log: Log, stacks: list) -> None:
    print("\n| tokens | path | tiles (bn, bk, warps, swap) | experts hit | MB | µs | GB/s | µs gate/up | GB/s | "
          "µs down | GB/s | err (norm / max) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    best = {}
    for tokens in DECODE_TOKENS:
        case = Case(stacks, tokens)
        st0, (top_i0, route0) = case.runs[0]
        for tiles in [REGISTERS, *SWEEP]:
            path = "registers" if tiles == REGISTERS else "dot_scaled"
            row = {"tokens": tokens, "path": path, "tiles": list(tiles), "copies": len(case.runs),
                   "experts_hit": case.experts_hit, "bytes": case.bytes()}  # fmt: skip
            try:
                err, max_err = errors(decode_run(case.x, st0, top_i0, route0, tiles=tiles), case.ref)
                us = case.time(partial(decode_run, tiles=tiles))
                us_gu = case.time(partial(decode_run, tiles=tiles, first_only=True))
            except Exception as e:  # a variant that does not compile or run is reported, not fatal
                row["error"] = repr(e)[:400]
                log.put("decode", row)
                print(f"| {tokens} | {path} | {list(tiles)} | failed: {row['error'][:160]} |")
                continue
            us_down = max(us - us_gu, 1e-3)  # (noise could leave nothing at the shortest steps)
            row |= {"us": us, "GBps": case.bytes() / us / 1e3, "us_gate_up": us_gu,
                    "GBps_gate_up": case.bytes(slice(0, 1)) / us_gu / 1e3, "us_down": us_down,
                    "GBps_down": case.bytes(slice(1, 2)) / us_down / 1e3, "err": err, "max_err": max_err}  # fmt: skip
            log.put("decode", row)
            print(f"| {tokens} | {path} | {list(tiles)} | {case.experts_hit:.1f} | {case.bytes() / 1e6:.1f} | "
                  f"{us:.1f} | {row['GBps']:.0f} | {us_gu:.1f} | {row['GBps_gate_up']:.0f} | {us_down:.1f} | "
                  f"{row['GBps_down']:.0f} | {err:.1e} / {max_err:.1e} |")  # fmt: skip
            best.setdefault((tokens, path), []).append(row)
        del case
    print("\n| tokens | registers µs | best dot_scaled µs | its tiles | speed-up | best gate/up tiles | "
          "best down tiles |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for tokens in DECODE_TOKENS:
        reg, scaled = best.get((tokens, "registers")), best.get((tokens, "dot_scaled"))
        if not reg or not scaled:
            continue
        fast = min(scaled, key=lambda r: r["us"])
        gu = min(scaled, key=lambda r: r["us_gate_up"])
        dn = min(scaled, key=lambda r: r["us_down"])
        summary = {"tokens": tokens, "registers_us": reg[0]["us"], "scaled_us": fast["us"], "tiles": fast["tiles"],
                   "speedup": reg[0]["us"] / fast["us"], "gate_up_tiles": gu["tiles"],
                   "down_tiles": dn["tiles"]}  # fmt: skip
        log.put("decode_best", summary)
        print(f"| {tokens} | {reg[0]['us']:.1f} | {fast['us']:.1f} | {fast['tiles']} | {summary['speedup']:.2f}× | "
              f"{gu['tiles']} ({gu['us_gate_up']:.1f} µs vs {reg[0]['us_gate_up']:.1f}) | "
              f"{dn['tiles']} ({dn['us_down']:.1f} µs vs {reg[0]['us_down']:.1f}) |")  # fmt: skip


def grouped_bench(log: Log, stacks: list) -> None:
    print("\n| tokens | path | experts hit | MB | µs | GB/s | err (norm / max) |")
    print("|---|---|---|---|---|---|---|")
    for tokens in GROUPED_TOKENS:
        case = Case(stacks, tokens)
        st0, (top_i0, route0) = case.runs[0]
        for scaled in (False, True):
            path = "dot_scaled" if scaled else "registers"
            fn = partial(moe.grouped_experts, **KW, scaled=scaled)
            row = {"tokens": tokens, "path": path, "copies": len(case.runs), "experts_hit": case.experts_hit,
                   "bytes": case.bytes()}  # fmt: skip
            try:
                err, max_err = errors(fn(case.x, st0, top_i0, route0), case.ref)
                us = case.time(fn)
            except Exception as e:
                row["error"] = repr(e)[:400]
                log.put("grouped", row)
                print(f"| {tokens} | {path} | failed: {row['error'][:160]} |")
                continue
            row |= {"us": us, "GBps": case.bytes() / us / 1e3, "err": err, "max_err": max_err}
            log.put("grouped", row)
            print(f"| {tokens} | {path} | {case.experts_hit:.1f} | {case.bytes() / 1e6:.1f} | {us:.1f} | "
                  f"{row['GBps']:.0f} | {err:.1e} / {max_err:.1e} |")  # fmt: skip
        del case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--only", nargs="*", default=["decode", "grouped"], choices=["decode", "grouped"])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out)
    log.path = args.out / "moe_scaled.json"
    import triton

    name = "cpu (interpreter)" if DRY else torch.cuda.get_device_name(DEV)
    log.data["device"] = {"name": name, "torch": torch.__version__, "triton": triton.__version__,
                          "cuda": torch.version.cuda, "shapes": {"E": E, "C": C, "I": I, "top_k": TOP_K}}  # fmt: skip
    print(log.data["device"])
    t0 = time.time()
    copy_bandwidth(log)
    stacks = [expert_stack() for _ in range(MAX_COPIES)]
    print(f"{MAX_COPIES} copies of the experts, {sum(nbytes(getattr(stacks[0], p)) for p in PROJ) / 1e6:.0f} MB "
          f"each ({time.time() - t0:.0f} s)")  # fmt: skip
    steps = {"decode": decode_bench, "grouped": grouped_bench}
    for part in args.only:
        t = time.time()
        try:
            steps[part](log, stacks)
        except Exception as e:  # keep what the other part measures
            log.put("failed", {"part": part, "error": repr(e)[:500]})
            print(f"{part} failed: {e!r}"[:500])
        print(f"({part}: {time.time() - t:.0f} s)")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
