"""Quantized decode on the CPU: TorchOps (dequantizes every weight every step) against CpuOps (engine/
cpu_ops.py: weights re-laid once at load), for the tiny model unquantized and quantized, in one run.

    python benchmarks/cpu_quantized.py [--workdir DIR] [--dtypes float32,bfloat16] [--rounds 20]
        [--prompt-tokens 90] [--gen-tokens 10] [--threads 1] [--markdown OUT.md] [--json OUT.json]

Models (made in `workdir` from `ossq.synth.synthesize(config="tiny", seed=0)` unless present there):
`unquantized` (`convert -d`: every weight bf16), `q4-g64` and `q8-g64` (affine, `--experts quantize`),
`q4-mxfp4` (`-q --q-bits 4`: the published MXFP4 experts kept, the rest affine 4-bit g64).

Speed: every (model, ops, dtype) is loaded into this one process, each with its own engine (prefix cache
off); then `rounds` rounds each run one greedy request of a `prompt_tokens` prompt on every configuration
in turn: the prefill step (which samples the first token) and the first decode step untimed, then
`gen_tokens` − 2 decode steps, each timed. Round-robin puts every configuration under the same load from
other processes on the machine, and a step's median time barely moves under a burst of it: decode tok/s
= 1 / the median step time, with 1 / the quartiles as its range.

Memory: each configuration once more in a fresh child process, which loads it and decodes a few tokens:
its peak RSS (Linux VmHWM, torch's runtime included), the exact bytes of the model's buffers and of
CpuOps's forms, and the load time (prepare included).

Last, the kernels alone: one-row matmul time of a dense weight and of torch's packed CPU kernels, per
activation dtype (median of 21 calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    "unquantized": {"dequantize": True},
    "q4-g64": {"quantize": True, "q_bits": 4, "q_group_size": 64, "experts": "quantize"},
    "q8-g64": {"quantize": True, "q_bits": 8, "q_group_size": 64, "experts": "quantize"},
    "q4-mxfp4": {"quantize": True, "q_bits": 4},
}
OPS = ("torch", "cpu")
KV_TOKENS = 1024


def make_models(workdir: Path) -> dict[str, Path]:
    from ossq.convert import convert
    from ossq.synth import synthesize

    src = workdir / "tiny"
    if not src.exists():
        synthesize(src, config="tiny", seed=0)
    out = {}
    for name, kwargs in MODELS.items():
        out[name] = workdir / name
        if not out[name].exists():
            convert(src, out[name], progress=False, **kwargs)
    return out


def load(path: str | Path, ops: str, dtype: str):
    from ossq.engine.engine import Engine, EngineConfig
    from ossq.engine.load import load_model

    model, _ = load_model(path, device="cpu", dtype=getattr(torch, dtype), ops=ops)
    return model, Engine(model, EngineConfig(kv_cache_tokens=KV_TOKENS, prefix_cache=False))


def decode(engine, prompt: list[int], gen_tokens: int) -> list[float]:
    """Seconds of each decode step of one greedy request but the first (the prefill step, which samples the
    first token, and the first decode step, which finds the caches full of the previous configuration's
    data, are untimed)."""
    engine.add_request(prompt, max_tokens=gen_tokens)
    engine.step()
    engine.step()
    steps = []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return steps


# ---- speed: all configurations in this process, round-robin --------------------------------------------
def speed(configs: list[tuple[str, str, str]], models: dict[str, Path], args: argparse.Namespace) -> dict:
    from ossq.bench import prompt_ids

    engines = {c: load(models[c[0]], c[1], c[2])[1] for c in configs}
    prompt = prompt_ids(args.prompt_tokens, vocab_size=next(iter(engines.values())).model.config.vocab_size, seed=0)
    steps: dict[tuple, list[float]] = {c: [] for c in configs}
    with torch.inference_mode():
        for engine in engines.values():
            decode(engine, prompt, 3)  # warm-up
        for r in range(args.rounds):
            for c, engine in engines.items():
                steps[c] += decode(engine, prompt, args.gen_tokens)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    out = {}
    for c, s in steps.items():
        q1, q2, q3 = statistics.quantiles(s, n=4)
        out[c] = {"tps": 1 / q2, "tps_q3": 1 / q3, "tps_q1": 1 / q1, "steps": len(s)}
    return out


# ---- memory: one configuration in a child process --------------------------------------------------------
def memory_child(path: str, ops: str, dtype: str, prompt_tokens: int) -> dict:
    from ossq.bench import prompt_ids
    from ossq.device import peak_rss_bytes

    t0 = time.perf_counter()
    model, engine = load(path, ops, dtype)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        decode(engine, prompt_ids(prompt_tokens, vocab_size=model.config.vocab_size, seed=0), 4)
    return {
        "peak_rss_mb": peak_rss_bytes() / 1e6,
        "weights_mb": sum(b.nbytes for b in model.buffers()) / 1e6,
        "forms_mb": getattr(model.ops, "cached_bytes", 0) / 1e6,
        "load_s": load_s,
    }


def memory(configs: list[tuple[str, str, str]], models: dict[str, Path], args: argparse.Namespace) -> dict:
    out = {}
    for m, o, d in configs:
        cmd = [sys.executable, __file__, "--memory-child", str(models[m]), o, d, str(args.prompt_tokens)]
        out[(m, o, d)] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out


# ---- the kernels alone --------------------------------------------------------------------------------
KERNEL_SHAPES = ((201088, 64, 64), (2880, 2880, 64))  # the tiny lm_head; a gpt-oss-20b projection


def kernels(repeats: int = 21) -> list[dict]:
    """One-row matmul (decode) time of a dense weight against torch's packed CPU kernels, per dtype."""
    rows = []
    for n, k, g in KERNEL_SHAPES:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.randn(k // g, n, 2)
        w8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.randn(n)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, w = torch.randn(1, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            sz_d, s8_d = sz.to(dtype), s8.to(dtype)
            row = {"shape": f"{n}×{k} g{g}", "dtype": str(dtype).removeprefix("torch.")}
            row["dense_ms"] = _time(lambda: torch.nn.functional.linear(x, w), repeats)  # noqa: B023
            int4 = torch.ops.aten._weight_int4pack_mm_for_cpu
            row["int4pack_ms"] = _time(lambda: int4(x, packed, g, sz_d), repeats)  # noqa: B023
            int8 = torch.ops.aten._weight_int8pack_mm
            row["int8pack_ms"] = _time(lambda: int8(x, w8, s8_d), repeats)  # noqa: B023
            rows.append(row)
    return rows


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# ---- the report ----------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    base = {r["dtype"]: r["tps"] for r in rows if r["model"] == "unquantized" and r["ops"] == "torch"}
    lines = [
        "| model | dtype | ops | decode tok/s | quartiles | vs unquantized + torch | peak RSS (MB) "
        "| weights (MB) | + forms (MB) | load (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['ops']} | {r['tps']:.1f} | {r['tps_q3']:.1f}–{r['tps_q1']:.1f} "
            f"| {r['tps'] / base[r['dtype']]:.2f}× | {r['peak_rss_mb']:.0f} | {r['weights_mb']:.1f} "
            f"| {r['forms_mb']:.1f} | {r['load_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def kernel_markdown(rows: list[dict]) -> str:
    lines = [
        "| weight | activations | dense (ms) | _weight_int4pack_mm_for_cpu (ms) | _weight_int8pack_mm (ms) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['dense_ms']:.3f} | {r['int4pack_ms']:.3f} | {r['int8pack_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-child":
        path, ops, dtype, prompt_tokens = argv[1:]
        print(json.dumps(memory_child(path, ops, dtype, int(prompt_tokens))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="where the models are made (default: a temp dir)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes, comma-separated")
    p.add_argument("--rounds", type=int, default=20, help="round-robin rounds, one request each (default 20)")
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--gen-tokens", type=int, default=10, help="tokens per request (default 10: 8 timed steps)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from ossq.report import system_info

    torch.set_num_threads(args.threads)
    configs = [(m, o, d) for d in args.dtypes.split(",") for m in MODELS for o in OPS]
    with tempfile.TemporaryDirectory(prefix="ossq-cpu-quantized-") as tmp:
        models = make_models(args.workdir or Path(tmp))
        fast, mem = speed(configs, models, args), memory(configs, models, args)
    rows = [{"model": m, "ops": o, "dtype": d, **fast[(m, o, d)], **mem[(m, o, d)]} for m, o, d in configs]
    kernel_rows = kernels()
    table = markdown(rows) + "\n" + kernel_markdown(kernel_rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        report = {"system": system_info("cpu"), "args": vars(args), "rows": rows, "kernels": kernel_rows}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
