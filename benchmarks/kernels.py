"""Kernel microbenchmarks on one CUDA GPU, at gpt-oss-20b shapes, each against its bandwidth bound and its
torch twin (TorchOps), in one run:

- copy bandwidth: a large device-to-device copy (read + write counted), and copies of exactly the bytes
  of each GEMV's packed weight;
- quantized GEMV (ossq/engine/triton/qmm.py), M = 1, 4-bit g64 and MXFP4, N × K = 5760 × 2880 (q/k/v-sized
  fused or gate+up), 2880 × 2880, 2880 × 4096 (o_proj), 201088 × 2880 (lm_head), over a sweep of tile
  shapes; then rows M = 1 … 64 at the default tiles; cuBLAS bf16 and the reference (dequantize + matmul)
  for scale;
- the decode mixture of experts (moe.py), 32 experts, top 4, one and eight tokens;
- paged decode attention (attention.py), 64 query / 8 kv heads, head dim 64, contexts 90 … 32k, sliding
  (128) and full, 1 … 64 sequences.

Every timing is the median over replays of a CUDA graph that runs the operation on several distinct
copies of its data (so weights come from HBM, not the 60 MB L2), divided by the copies; it includes the
kernel boundary a decode step would pay. Every variant's output is checked against the float32 reference
before it is timed. Weights are random bits (speed does not depend on the values).

    python benchmarks/kernels.py --out DIR [--quick] [--only gemv rows moe attention]

writes DIR/kernels.json (rewritten as it goes) and prints markdown tables. `--dry` runs every part at tiny
shapes on the CPU through Triton's interpreter, to check the script itself before a device call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DRY = "--dry" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from ossq.engine.batch import Batch, SeqChunk  # noqa: E402
from ossq.engine.kv import BLOCK_TOKENS  # noqa: E402
from ossq.engine.ops import TorchOps  # noqa: E402
from ossq.engine.triton import attention, fused, moe, qmm  # noqa: E402
from ossq.engine.triton.ops import TritonOps  # noqa: E402
from ossq.quant.spec import QuantSpec  # noqa: E402

DEV = torch.device("cpu" if DRY else "cuda")
BF16 = torch.float32 if DRY else torch.bfloat16  # the interpreter's bfloat16 arithmetic is broken
ROTATE_BYTES = (1 << 16) if DRY else (512 << 20)  # distinct data per timed graph: several times the L2
GEMV_SHAPES = [(40, 256), (201, 128)] if DRY else [(5760, 2880), (2880, 2880), (2880, 4096), (201088, 2880)]
LM_HEAD = 201 if DRY else 201088
ROWS_SHAPE = (40, 256) if DRY else (5760, 2880)
MOE_DIMS = (6, 64, 128) if DRY else (32, 2880, 2880)  # E, C, I
ATTN = [(1, 40), (3, 70)] if DRY else [(1, 90), (1, 4096), (1, 32768), (8, 4096), (64, 1024), (64, 4096)]
REF = TorchOps()
SPECS = {"4b-g64": QuantSpec(4, 64), "mxfp4": QuantSpec(4, 32, "mxfp4")}
MOE_TILES = [
    (8, 1024, 4, None),
    (8, 1024, 4, False),
    (16, 512, 4, None),
    (4, 1024, 2, None),
    (8, 512, 4, None),
    (16, 1024, 8, None),
]  # (block_n, block_k, num_warps, int_dot); None: on for bfloat16 (qmm.int_dot_mode)
ROWS = (1, 2, 4, 8, 16, 32, 64)
SWEEP = [  # (block_n, block_k, num_warps, num_stages, magic, split_k, int_dot); None: qmm's default for the shape
    None,
    (16, 512, 4, 2, True, None, False),  # the float decode, for the integer dot's ratio
    (4, 1024, 2, 2, True, None, False),
    (16, 512, 4, 2, True, None, None),
    (16, 512, 4, 2, False, None, False),
    (8, 512, 4, 2, True, None, None),
    (32, 512, 4, 2, True, None, None),
    (16, 256, 4, 2, True, None, None),
    (16, 1024, 4, 2, True, None, None),
    (8, 1024, 8, 2, True, None, None),
    (16, 512, 8, 2, True, None, None),
    (16, 512, 4, 2, True, 1, None),
    (16, 512, 4, 2, True, 4, None),
    (4, 1024, 2, 2, True, None, None),
]


class Log:
    def __init__(self, out: Path) -> None:
        self.path = out / "kernels.json"
        self.data: dict = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat()}

    def put(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        self.path.write_text(json.dumps(self.data, indent=1))


def graph_us(calls, trials: int = 15) -> float:
    """Median µs per call over replays of one CUDA graph holding every call once."""
    if DRY:
        t = time.perf_counter()
        for f in calls:
            f()
        return (time.perf_counter() - t) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def eager_us(f, reps: int = 20) -> float:
    """Median µs of `f` launched on its own, timed with events (no graph)."""
    f()
    times = []
    for _ in range(reps):
        if DRY:
            t = time.perf_counter()
            f()
            times.append((time.perf_counter() - t) * 1e6)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def random_linear(spec: QuantSpec | None, lead: tuple[int, ...], n: int, k: int, *, bias: bool = True):
    """Random stored bits in the MLX layout (E8M0 bytes near 2^0 for MXFP4, small bf16 scales for affine)."""
    if spec is None:
        w = torch.randn(*lead, n, k, device=DEV, dtype=BF16) * k**-0.5
        return SimpleNamespace(spec=None, weight=w, scales=None, biases=None, bias=None)
    words = torch.randint(-(2**31), 2**31, (*lead, n, k * spec.bits // 32), device=DEV, dtype=torch.int64)
    weight = words.to(torch.int32).view(torch.uint32)
    groups = (*lead, n, k // spec.group_size)
    if spec.mode == "mxfp4":
        scales, biases = torch.randint(118, 124, groups, device=DEV, dtype=torch.uint8), None
    else:
        scales = (torch.randn(groups, device=DEV) * 0.01).to(BF16)
        biases = (torch.randn(groups, device=DEV) * 0.05).to(BF16)
    b = (torch.randn(*lead, n, device=DEV) * 0.1).to(BF16) if bias else None
    return SimpleNamespace(spec=spec, weight=weight, scales=scales, biases=biases, bias=b)


def nbytes(lin) -> int:
    return sum(t.nbytes for t in (lin.weight, lin.scales, lin.biases, lin.bias) if t is not None)


def as_float(lin):
    def up(t):
        return None if t is None or not t.is_floating_point() else t.float()

    scales = lin.scales if lin.spec is not None and lin.spec.mode == "mxfp4" else up(lin.scales)
    return SimpleNamespace(spec=lin.spec, weight=lin.weight, scales=scales, biases=up(lin.biases), bias=up(lin.bias))


def tiles_of(v: tuple | None) -> qmm.Tiles | None:
    if v is None:
        return None
    bn, bk, warps, stages, magic, split, int_dot = v
    return qmm.Tiles(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, magic=magic, split_k=split,
                     int_dot=int_dot)  # fmt: skip


def qmm_call(x, lin, tiles):
    return qmm.qmm(x, lin.weight, lin.scales, lin.biases, lin.bias, lin.spec, tiles=tiles)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copies_for(one: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / one))


# ----------------------------------------------------------------------------------------------- copy


def copy_bandwidth(log: Log) -> float:
    src = torch.empty(1 << 20 if DRY else 4 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = graph_us([partial(dst.copy_, src)] * 4, trials=12)
    eager = eager_us(partial(dst.copy_, src))
    bw = 2 * src.nbytes / us / 1e3  # GB/s, read + write
    log.put("copy", {"bytes": src.nbytes, "us": us, "GBps_rw": bw, "eager_us": eager})
    print(f"copy 4 GiB: {us:.0f} µs in a graph, {eager:.0f} µs eager → {bw:.0f} / {2 * src.nbytes / eager / 1e3:.0f} "
          "GB/s (read + write)")  # fmt: skip
    del src, dst
    return bw


def same_bytes_copy(size: int) -> tuple[float, float]:
    """(µs, read+write GB/s) of copying `size` bytes, rotating over distinct buffers."""
    count = copies_for(size)
    bufs = [(torch.empty(size, dtype=torch.uint8, device=DEV), torch.empty(size, dtype=torch.uint8, device=DEV))
            for _ in range(count)]  # fmt: skip
    us = graph_us([partial(d.copy_, s) for s, d in bufs])
    return us, 2 * size / us / 1e3


# ----------------------------------------------------------------------------------------------- GEMV


def gemv(log: Log, quick: bool) -> None:
    shapes = GEMV_SHAPES
    sweep = SWEEP[:1] if quick else SWEEP
    print("\n| weights | N × K | MB packed | tiles (bn, bk, warps, stages, magic, split, int dot) | µs | GB/s | "
          "of same-bytes copy | err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in SPECS.items():
        for n, k in shapes:
            lins = [random_linear(spec, (), n, k, bias=n != LM_HEAD)]
            size = nbytes(lins[0])
            lins += [random_linear(spec, (), n, k, bias=n != LM_HEAD) for _ in range(copies_for(size) - 1)]
            copy_us, copy_bw = same_bytes_copy(size)
            x = torch.randn(1, k, device=DEV).to(BF16)
            ref = REF.linear(x.float(), as_float(lins[0]))
            variants = sweep if n != LM_HEAD else sweep[:3]
            for v in variants:
                tiles = tiles_of(v) or qmm.default_tiles(1, n, k, spec)
                t = tiles
                row = {"weights": name, "N": n, "K": k, "M": 1, "bytes": size, "tiles": [t.block_n, t.block_k,
                       t.num_warps, t.num_stages, t.magic, t.split_k, t.int_dot, "default" if v is None else ""],
                       "copy_us": copy_us, "copy_GBps_rw": copy_bw}  # fmt: skip
                l0 = lins[0]
                try:
                    err = rel_err(qmm.qmm(x, l0.weight, l0.scales, l0.biases, l0.bias, spec, tiles=tiles), ref)
                    us = graph_us([partial(qmm_call, x, lin, tiles) for lin in lins])
                except Exception as e:  # a variant that does not compile or run is reported, not fatal
                    row["error"] = repr(e)[:300]
                    log.put("gemv", row)
                    print(f"| {name} | {n}×{k} | — | {row['tiles']} | failed: {row['error'][:80]} |")
                    continue
                bw = size / us / 1e3
                row |= {"us": us, "GBps": bw, "of_copy": bw / copy_bw, "err": err}
                log.put("gemv", row)
                print(f"| {name} | {n}×{k} | {size / 1e6:.2f} | {row['tiles']} | {us:.2f} | {bw:.0f} | "
                      f"{bw / copy_bw:.0%} | {err:.1e} |")  # fmt: skip
            reference_and_cublas(log, name, spec, lins, x, n, k)
            del lins


def reference_and_cublas(log: Log, name: str, spec: QuantSpec, lins, x, n: int, k: int) -> None:
    """The torch twin on the same weights, and cuBLAS on a bf16 weight of the same shape, for scale."""
    try:
        ref_us = graph_us([partial(REF.linear, x, lin) for lin in lins[:4]], trials=5)
    except Exception as e:
        ref_us = float("nan")
        print(f"reference not timed: {e!r}"[:200])
    dense = [torch.randn(n, k, device=DEV, dtype=BF16) for _ in range(copies_for(2 * n * k))]
    cublas_us = graph_us([partial(F.linear, x, w) for w in dense])
    log.put("gemv_context", {"weights": name, "N": n, "K": k, "reference_us": ref_us, "cublas_bf16_us": cublas_us,
                             "cublas_GBps": 2 * n * k / cublas_us / 1e3})  # fmt: skip
    print(f"|   | reference (dequantize + matmul) {ref_us:.1f} µs; cuBLAS bf16 {cublas_us:.2f} µs "
          f"({2 * n * k / cublas_us / 1e3:.0f} GB/s) |")  # fmt: skip
    del dense


def gemv_rows(log: Log) -> None:
    """Rows 1 … 64 at the default tiles, through the tensor-core kernel and (up to 8 rows) the reduce one."""
    print("\n| weights | N × K | M | kernel | µs | GB/s of weights | reference µs | err |")
    print("|---|---|---|---|---|---|---|---|")
    n, k = ROWS_SHAPE
    default = qmm.REDUCE_MAX_ROWS
    for name, spec in SPECS.items():
        lins = [random_linear(spec, (), n, k) for _ in range(copies_for(n * k // 2))]
        for m in ROWS:
            x = torch.randn(m, k, device=DEV).to(BF16)
            ref_us = graph_us([partial(REF.linear, x, lin) for lin in lins[:4]], trials=5)
            for reduce_rows in (1, m) if 1 < m <= 8 else (default,):
                qmm.REDUCE_MAX_ROWS = reduce_rows
                kernel = "reduce" if m <= reduce_rows else "tensor cores"
                err = rel_err(qmm_call(x, lins[0], None), REF.linear(x.float(), as_float(lins[0])))
                us = graph_us([partial(qmm_call, x, lin, None) for lin in lins])
                log.put("gemv_rows", {"weights": name, "N": n, "K": k, "M": m, "kernel": kernel, "us": us, "err": err,
                                      "ref_us": ref_us})  # fmt: skip
                gbps = nbytes(lins[0]) / us / 1e3
                print(f"| {name} | {n}×{k} | {m} | {kernel} | {us:.2f} | {gbps:.0f} | {ref_us:.1f} | {err:.1e} |")
            qmm.REDUCE_MAX_ROWS = default
        del lins


# ----------------------------------------------------------------------------------------------- MoE


def linear_then_route(x, router, top_k: int):
    """The routing as two launches, the router linear then fused.route: what moe.route fuses."""
    return fused.route(TritonOps().linear(x, router), top_k)


def moe_bench(log: Log) -> None:
    (E, C, I), top_k = MOE_DIMS, 4
    print("\n| experts | tokens | what | µs Triton | µs reference (whole MoE) | selected-expert MB | GB/s | err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in SPECS.items():
        layers = [SimpleNamespace(router=random_linear(QuantSpec(8, 64), (), E, C), experts=SimpleNamespace(
            gate_proj=random_linear(spec, (E,), I, C), up_proj=random_linear(spec, (E,), I, C),
            down_proj=random_linear(spec, (E,), C, I))) for _ in range(1 if DRY else 4)]  # fmt: skip
        per_expert = sum(nbytes(getattr(layers[0].experts, p)) for p in ("gate_proj", "up_proj", "down_proj")) / E
        l0 = layers[0]
        f0 = SimpleNamespace(router=as_float(l0.router), experts=SimpleNamespace(
            **{p: as_float(getattr(l0.experts, p)) for p in ("gate_proj", "up_proj", "down_proj")}))  # fmt: skip
        kw = dict(top_k=top_k, limit=7.0, alpha=1.702)
        for tokens in (1,) if DRY else (1, 8):
            x = torch.randn(tokens, C, device=DEV).to(BF16)
            err = rel_err(TritonOps().moe(x, l0, **kw), REF.moe(x.float(), f0, **kw))
            ref_us = graph_us([partial(REF.moe, x, mlp, **kw) for mlp in layers], trials=5)
            read = tokens * top_k * per_expert  # each pair reads its expert
            routes = [fused.route(TritonOps().linear(x, mlp.router), top_k) for mlp in layers]
            same = REF._experts_grouped(x.float(), f0.experts, *routes[0], limit=7.0, alpha=1.702)
            for bn, bk, warps, int_dot in MOE_TILES:  # the two expert kernels alone, on each layer's routing
                t = dict(block_n=bn, block_k=bk, num_warps=warps, int_dot=int_dot)
                tiles = [bn, bk, warps, int_dot]
                e = rel_err(moe.experts(x, l0.experts, *routes[0], limit=7.0, alpha=1.702, **t), same)
                us = graph_us([partial(moe.experts, x, mlp.experts, *r, limit=7.0, alpha=1.702, **t)
                               for mlp, r in zip(layers, routes, strict=True)])  # fmt: skip
                log.put("moe", {"experts": name, "tokens": tokens, "tiles": tiles, "us": us, "ref_us": ref_us,
                                "bytes": read, "err": e})  # fmt: skip
                print(f"| {name} | {tokens} | experts {tiles} | {us:.1f} | {ref_us:.1f} | {read / 1e6:.1f} | "
                      f"{read / us / 1e3:.0f} | {e:.1e} |")  # fmt: skip
            two = graph_us([partial(linear_then_route, x, mlp.router, top_k) for mlp in layers])
            one = graph_us([partial(moe.route, x, mlp.router, top_k) for mlp in layers])
            log.put("route", {"experts": name, "tokens": tokens, "linear_then_route_us": two, "fused_us": one})
            print(f"| {name} | {tokens} | routing: router linear + top-k / fused | {two:.1f} / {one:.1f} | | | | |")
            us = graph_us([partial(TritonOps().moe, x, mlp, **kw) for mlp in layers])
            log.put("moe", {"experts": name, "tokens": tokens, "tiles": "default, with router", "us": us,
                            "ref_us": ref_us, "bytes": read, "err": err})  # fmt: skip
            print(f"| {name} | {tokens} | router + top-k + experts | {us:.1f} | {ref_us:.1f} | {read / 1e6:.1f} | "
                  f"{read / us / 1e3:.0f} | {err:.1e} |")  # fmt: skip
        del layers


# ----------------------------------------------------------------------------------------------- attention


def attention_bench(log: Log) -> None:
    H, K, D = 64, 8, 64
    print("\n| seqs | context | window | splits | µs Triton | µs reference | KV MB read | GB/s | err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seqs, ctx in ATTN:
        per = -(-ctx // BLOCK_TOKENS)
        blocks = seqs * per
        chunks = [SeqChunk([0], ctx - 1, range(s * per, (s + 1) * per)) for s in range(seqs)]
        batch = Batch.build(chunks, device=DEV)
        layers = max(2, min(8, copies_for(2 * blocks * BLOCK_TOKENS * K * D * 2)))
        pools = [(torch.randn(blocks * BLOCK_TOKENS, K, D, device=DEV).to(BF16),
                  torch.randn(blocks * BLOCK_TOKENS, K, D, device=DEV).to(BF16)) for _ in range(layers)]  # fmt: skip
        q = torch.randn(seqs, H, D, device=DEV).to(BF16)
        sinks = torch.randn(H, device=DEV).to(BF16)
        for window in (128, None):
            kw = dict(window=window, scale=0.125)
            kp, vp = pools[0]
            err = rel_err(attention.decode(q, kp, vp, sinks, batch, **kw),
                          REF.attention(q.float(), kp.float(), vp.float(), sinks.float(), batch, **kw))  # fmt: skip
            us = graph_us([partial(attention.decode, q, *p, sinks, batch, **kw) for p in pools])
            ref_us = graph_us([partial(REF.attention, q, *p, sinks, batch, **kw) for p in pools[:2]], trials=5)
            read = seqs * min(ctx, window or ctx) * K * D * 2 * 2
            splits = attention.splits_for(seqs, K, DEV, window)
            log.put("attention", {"seqs": seqs, "context": ctx, "window": window, "splits": splits, "us": us,
                                  "ref_us": ref_us, "bytes": read, "err": err})  # fmt: skip
            print(f"| {seqs} | {ctx} | {window} | {splits} | {us:.1f} | {ref_us:.1f} | {read / 1e6:.2f} | "
                  f"{read / us / 1e3:.0f} | {err:.1e} |")  # fmt: skip
        del pools


# ----------------------------------------------------------------------------------------------- the model


def model_decode(log: Log) -> None:
    """A synthetic gpt-oss-20b built on the device from random stored bits (MXFP4 experts, 8-bit g64
    routers, 4-bit g64 elsewhere), one sequence: prefill a 90-token prompt, then decode — TorchOps, then
    TritonOps on the same weights. Eager launches: no CUDA graphs yet."""
    from ossq.config import PRESETS
    from ossq.engine.engine import Engine, EngineConfig
    from ossq.engine.model import GptOss
    from ossq.formats.mlx import linear_modules

    config = dataclasses.replace(PRESETS["tiny"], vocab_size=512) if DRY else PRESETS["20b"]
    kinds = {"gate_proj": SPECS["mxfp4"], "up_proj": SPECS["mxfp4"], "down_proj": SPECS["mxfp4"],
             "router": QuantSpec(8, 32 if DRY else 64)}  # fmt: skip
    rest = QuantSpec(4, 32) if DRY else SPECS["4b-g64"]
    specs = {m.path: kinds.get(m.kind, rest) for m in linear_modules(config)}
    with torch.device(DEV):
        model = GptOss(config, specs, dtype=BF16).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if b.dtype == torch.uint32:
                b.view(torch.int32).random_()
            elif b.dtype == torch.uint8:
                b.random_(118, 124)
            elif "norm" in name:
                b.fill_(1.0)
            elif not name.endswith("inv_freq"):
                b.normal_(0, 0.01 if name.endswith("scales") else 0.02)
    weight_bytes = sum(b.nbytes for b in model.buffers())
    prompt = torch.randint(0, config.vocab_size, (90,)).tolist()
    for ops in (TorchOps(), TritonOps()):
        for m in model.modules():  # the same weights through the other op set (benchmark only)
            if hasattr(m, "ops"):
                m.ops = ops
        n = 3 if DRY else (12 if ops.name == "torch" else 64)
        engine = Engine(model, EngineConfig(kv_cache_tokens=1024, max_num_seqs=1, prefix_cache=False))
        engine.add_request(prompt[:20], max_tokens=3)  # compile every kernel variant outside the timing
        while engine.has_unfinished:
            engine.step()
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, max_tokens=n)
        while engine.has_unfinished:
            engine.step()
        t = engine.stats.times[rid]
        decode = (n - 1) / (t.last_token - t.first_token)
        row = {"ops": ops.name, "decode_tok_s": decode, "ttft_s": t.first_token - t0, "tokens": n,
               "weight_GB": weight_bytes / 1e9}  # fmt: skip
        log.put("model", row)
        print(f"model 20b-shaped, {ops.name}: decode {decode:.1f} tok/s ({n} tokens), first token "
              f"{row['ttft_s'] * 1e3:.0f} ms, {weight_bytes / 1e9:.2f} GB of stored weights")  # fmt: skip
    del model


# ----------------------------------------------------------------------------------------------- warm-up


def warm_jobs(quick: bool) -> list[tuple]:
    """Every kernel specialisation the timed parts will launch, as (part, spec name, …) jobs."""
    sweep = SWEEP[:1] if quick else SWEEP
    jobs = []
    for name in SPECS:
        for n, k in GEMV_SHAPES:
            variants = sweep if n != LM_HEAD else sweep[:3]
            jobs += [("gemv", name, n, k, 1, v, 1) for v in variants]
        jobs += [("gemv", name, *ROWS_SHAPE, m, None, r) for m in ROWS for r in (1, m) if r == 1 or m <= 8]
        jobs += [("moe", name, t) for t in MOE_TILES]
    return jobs


def warm_one(job: tuple) -> str:
    """Compile (and run once) one job's kernel, so the timing process finds it in Triton's cache."""
    try:
        if job[0] == "gemv":
            _, name, n, k, m, v, reduce_rows = job
            lin = random_linear(SPECS[name], (), n, k, bias=n != LM_HEAD)
            qmm.REDUCE_MAX_ROWS = reduce_rows
            qmm_call(torch.randn(m, k, device=DEV).to(BF16), lin, tiles_of(v))
        else:
            _, name, (bn, bk, warps, int_dot) = job
            (E, C, I), spec = MOE_DIMS, SPECS[name]
            ex = SimpleNamespace(gate_proj=random_linear(spec, (E,), I, C), up_proj=random_linear(spec, (E,), I, C),
                                 down_proj=random_linear(spec, (E,), C, I))  # fmt: skip
            top_i = torch.randint(0, E, (1, 4), device=DEV)
            moe.experts(torch.randn(1, C, device=DEV).to(BF16), ex, top_i, torch.rand(1, 4, device=DEV), limit=7.0,
                        alpha=1.702, block_n=bn, block_k=bk, num_warps=warps, int_dot=int_dot)  # fmt: skip
        torch.cuda.synchronize() if not DRY else None
        return "ok"
    except Exception as e:
        return f"{job}: {e!r}"[:300]


def warm(jobs: list[tuple], workers: int) -> None:
    t = time.time()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [r for r in pool.map(warm_one, jobs) if r != "ok"]
    print(f"warmed {len(jobs)} kernels in {time.time() - t:.0f} s with {workers} processes; failed: {failed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="three tile shapes instead of the whole sweep")
    ap.add_argument("--only", nargs="*", default=["gemv", "moe", "attention", "rows", "model"])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--warm", type=int, default=0, help="compile every kernel first in this many processes")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out)
    import triton

    name, sms = ("cpu (interpreter)", 1) if DRY else (torch.cuda.get_device_name(DEV), torch.cuda.get_device_properties(
        DEV).multi_processor_count)  # fmt: skip
    log.data["device"] = {"name": name, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
                          "cuda": torch.version.cuda}  # fmt: skip
    print(log.data["device"])
    t0 = time.time()
    if args.warm:
        warm(warm_jobs(args.quick), args.warm)
    copy_bandwidth(log)
    steps = {"gemv": lambda: gemv(log, args.quick), "rows": lambda: gemv_rows(log), "moe": lambda: moe_bench(log),
             "attention": lambda: attention_bench(log), "model": lambda: model_decode(log)}  # fmt: skip
    for name in args.only:
        t = time.time()
        try:
            steps[name]()
        except Exception as e:  # keep what the other parts measure
            log.put("failed", {"part": name, "error": repr(e)[:500]})
            print(f"{name} failed: {e!r}"[:500])
        print(f"({name}: {time.time() - t:.0f} s)")
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
