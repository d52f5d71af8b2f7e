"""The quantization quality table of the small trained gpt-oss (benchmarks/train_small.py): every variant
converted with `ossq convert` and scored with `ossq ppl` on the held-out text against the unquantized
checkpoint (MXFP4 experts, bf16 rest) — perplexity, mean and p99 KL, top-1 agreement, bits per weight.

    python benchmarks/quality.py --work DIR --out OUT [--device cuda] [--only NAME ...]

DIR is train_small.py's --out (model/, heldout.txt, calib.txt). Writes OUT/quality.md and
OUT/quality.json (the table), OUT/ppl.json (ossq ppl's own report). A variant whose conversion fails gets
a row with its error; the rest still run. Run by benchmarks/quality.sh.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

RTN = {f"q{b}g{g}": {"q_bits": b, "q_group_size": g, "experts": "quantize"} for b in (3, 4, 6, 8) for g in (32, 64)}
VARIANTS: dict[str, dict[str, Any]] = {
    **RTN,
    "mxfp4-kept+q8": {"q_bits": 8},  # the experts stay as released, everything else 8-bit g64
    "mixed_3_6": {"quant_predicate": "mixed_3_6", "experts": "quantize"},
    "tiered": {"quant_predicate": "tiered", "experts": "quantize"},
    **{f"gptq-q{b}g{g}": {**RTN[f"q{b}g{g}"], "calibrate": "gptq"} for b in (3, 4) for g in (32, 64)},
    **{f"awq-q{b}g64": {**RTN[f"q{b}g64"], "calibrate": "awq"} for b in (3, 4)},
    "target-3.6": {"target_bpw": 3.6, "experts": "quantize"},
    "target-3.6-gptq": {"target_bpw": 3.6, "experts": "quantize", "calibrate": "gptq"},
    "target-4.25": {"target_bpw": 4.25, "experts": "quantize"},
    "target-4.25-gptq": {"target_bpw": 4.25, "experts": "quantize", "calibrate": "gptq"},
}


def convert_all(work: Path, names: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each variant converted into work/variants/NAME; → name → {path, bits_per_weight, bytes, seconds} or
    {error}."""
    from ossq.convert import convert

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        kwargs = dict(VARIANTS[name])
        if "calibrate" in kwargs or "target_bpw" in kwargs:
            kwargs.update(calib_data=str(work / "calib.txt"), calib_tokens=args.calib_tokens)
        dest = work / "variants" / name
        start = time.perf_counter()
        try:
            r = convert(work / "model", dest, quantize=True, force=True, progress=False, device=args.device, **kwargs)
            out[name] = {"path": str(dest), "bits_per_weight": r.bits_per_weight, "bytes": r.output_bytes}
        except Exception as e:  # a failed variant is a row, not the end of the run
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        out[name]["convert_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {out[name]}", flush=True)
    return out


def score(work: Path, variants: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One `ossq ppl` run over every converted variant, KL against the unquantized checkpoint."""
    from ossq.perplexity import perplexity

    reference = str(work / "model")
    models = [reference, *(v["path"] for v in variants.values() if "path" in v)]
    report = perplexity(
        models,
        data=str(work / "heldout.txt"),
        window=args.window,
        max_tokens=args.eval_tokens,
        kl_reference=reference,
        reference=reference,
        device=args.device,
        ops=args.ops,
        progress=False,
        json_path=args.out / "ppl.json",
    )
    return {r.model: r.row() for r in report.results}


def table(variants: dict[str, dict[str, Any]], rows: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    ref = rows[str(work / "model")]
    out = [{"variant": "unquantized (MXFP4 experts, bf16 rest)", **ref}]
    for name, v in variants.items():
        row = rows.get(v.get("path", ""), {})
        out.append({"variant": name, **v, **{k: x for k, x in row.items() if k != "model"}})
    return out


def markdown(lines: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    cols = ("variant", "bits/weight", "size MB", "perplexity", "mean KL", "p99 KL", "top-1")
    text = [f"Held-out quality of the small trained gpt-oss; settings: `{json.dumps(settings)}`", ""]
    text += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in lines:
        if r.get("error"):
            text.append(f"| {r['variant']} | error: {r['error'][:80]} |" + " |" * (len(cols) - 2))
            continue
        cells = (
            r["variant"],
            _fmt(r.get("bits_per_weight"), "{:.3f}"),
            _fmt(r.get("bytes") and r["bytes"] / 1e6, "{:.1f}"),
            _fmt(r.get("perplexity"), "{:.3f}"),
            _fmt(r.get("kl_mean"), "{:.5f}"),
            _fmt(r.get("kl_p99"), "{:.5f}"),
            _fmt(r.get("top1_agreement"), "{:.2%}"),
        )
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n"


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--ops", default="torch", help="engine ops for ossq ppl (torch: no kernel compilation)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the converted variants on disk")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    start = time.perf_counter()
    variants = convert_all(args.work, names, args)
    rows = score(args.work, variants, args)
    settings = {k: v for k, v in vars(args).items() if k in ("window", "eval_tokens", "calib_tokens", "device", "ops")}
    settings["seconds"] = round(time.perf_counter() - start, 1)
    lines = table(variants, rows, args.work)
    (args.out / "quality.json").write_text(json.dumps({"settings": settings, "rows": lines}, indent=2, default=str))
    (args.out / "quality.md").write_text(markdown(lines, settings))
    print(markdown(lines, settings))
    if not args.keep:
        shutil.rmtree(args.work / "variants", ignore_errors=True)


if __name__ == "__main__":
    main()
