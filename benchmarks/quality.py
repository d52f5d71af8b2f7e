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
import dataclasses
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

DWQ_TOKENS, DWQ_STEPS = 32768, 400
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
    # the experts pinned as released (MXFP4, no loss): the allocator shares the rest of the size out
    "target-4.25-keep": {"target_bpw": 4.25},
    "target-4.25-keep-gptq": {"target_bpw": 4.25, "calibrate": "gptq"},
    # the tiered recipe's own size on this model (its embedding and lm_head make it far more than 3.6)
    "target-tiered": {"target_bpw": "tiered", "experts": "quantize"},
    "target-tiered-gptq": {"target_bpw": "tiered", "experts": "quantize", "calibrate": "gptq"},
    # distillation (quant/dwq.py) wants more text than GPTQ: these see 32k calibration tokens, as does the
    # GPTQ-only row they are compared with
    "target-4.25-gptq-32k": {
        "target_bpw": 4.25,
        "experts": "quantize",
        "calibrate": "gptq",
        "calib_tokens": DWQ_TOKENS,
    },
    **{
        f"{name}-dwq{'' if lr == 1e-3 else f'-lr{lr:g}'}": {
            **base,
            "calib_tokens": DWQ_TOKENS,
            "distill": DWQ_STEPS,
            "distill_lr": lr,
        }
        for name, base in (
            ("gptq-q4g64", {**RTN["q4g64"], "calibrate": "gptq"}),
            ("gptq-q3g64", {**RTN["q3g64"], "calibrate": "gptq"}),
            ("target-4.25-gptq", {"target_bpw": 4.25, "experts": "quantize", "calibrate": "gptq"}),
            ("target-4.25-keep-gptq", {"target_bpw": 4.25, "calibrate": "gptq"}),
            ("target-4.0-gptq", {"target_bpw": 4.0, "experts": "quantize", "calibrate": "gptq"}),
            ("target-3.6-gptq", {"target_bpw": 3.6, "experts": "quantize", "calibrate": "gptq"}),
        )
        for lr in (1e-3, 3e-3)
    },
}


def convert_one(work: Path, name: str, done: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Variant `name` converted into work/variants/NAME → {path, bits_per_weight, bytes, convert_seconds}
    or {error}; `done` holds the variants converted before it (target-tiered needs tiered's size)."""
    from ossq.convert import convert

    kwargs = dict(VARIANTS[name])
    if kwargs.get("target_bpw") == "tiered":
        if "bits_per_weight" not in done.get("tiered", {}):
            return {"error": "needs the tiered variant converted first (list it before this one)"}
        kwargs["target_bpw"] = done["tiered"]["bits_per_weight"]
    if "calib_tokens" in kwargs:  # the distillation rows and their GPTQ-only twin
        kwargs["calib_tokens"] = args.dwq_tokens
    if "distill" in kwargs:
        kwargs["distill"] = args.dwq_steps
    if {"calibrate", "target_bpw", "distill"} & set(kwargs):
        kwargs.setdefault("calib_tokens", args.calib_tokens)
        kwargs.update(calib_data=str(work / "calib.txt"))
    dest = work / "variants" / name
    start = time.perf_counter()
    try:
        r = convert(work / "model", dest, quantize=True, force=True, progress=False, device=args.device, **kwargs)
        out = {"path": str(dest), "bits_per_weight": r.bits_per_weight, "bytes": r.output_bytes}
        out["storage"] = storage(dest)
        if r.distilled:
            out["distilled"] = dataclasses.asdict(r.distilled)
    except Exception as e:  # a failed variant is a row, not the end of the run
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    out["convert_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {out}", flush=True)
    return out


def storage(path: Path) -> dict[str, dict[str, int]]:
    """Per module kind (q_proj, down_proj, lm_head, …), how many modules each storage holds: what an
    allocation chose."""
    from ossq.formats.hf import Checkpoint
    from ossq.formats.mlx import linear_modules

    ckpt = Checkpoint(path)
    out: dict[str, dict[str, int]] = {}
    for m in linear_modules(ckpt.config):
        s = ckpt.specs[m.path]
        name = "bf16" if s is None else "mxfp4" if s.mode == "mxfp4" else f"{s.bits}b g{s.group_size}"
        out.setdefault(m.kind, {}).setdefault(name, 0)
        out[m.kind][name] += 1
    ckpt.close()
    return out


def run(work: Path, names: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """`ossq ppl` of the unquantized checkpoint, then each variant converted and scored with KL against
    it in turn, so that each row is printed (and the table rewritten) as soon as it is measured and a run
    cut short keeps what it measured; → (variants, rows)."""
    from ossq.perplexity import perplexity

    reference = str(work / "model")
    settings = dict(data=str(work / "heldout.txt"), window=args.window, max_tokens=args.eval_tokens)
    settings.update(device=args.device, ops=args.ops, progress=False)
    variants: dict[str, dict[str, Any]] = {}
    rows: dict[str, Any] = {}
    reports: list[dict[str, Any]] = []
    for name in [None, *names]:
        if name is not None:
            variants[name] = convert_one(work, name, variants, args)
        path = reference if name is None else variants[name].get("path")
        if path is not None:
            start = time.perf_counter()
            kl = {} if path == reference else {"kl_reference": reference}
            report = perplexity([path], **settings, **kl)
            rows.update({r.model: r.row() for r in report.results})
            reports.append(report.report.to_dict())
            print(f"scored {name or 'unquantized'} in {time.perf_counter() - start:.1f} s: {rows[path]}", flush=True)
            (args.out / "ppl.json").write_text(json.dumps(reports, indent=2, default=str))
        write_table(variants, rows, work, args)
    return variants, rows


def write_table(variants: dict[str, dict[str, Any]], rows: dict[str, Any], work: Path, args: argparse.Namespace) -> str:
    """quality.md and quality.json from the rows measured so far; → the markdown."""
    settings = {k: v for k, v in vars(args).items() if k in ("window", "eval_tokens", "calib_tokens", "device", "ops")}
    settings["seconds"] = round(time.perf_counter() - args.start, 1)
    lines = table(variants, rows, work)
    (args.out / "quality.json").write_text(json.dumps({"settings": settings, "rows": lines}, indent=2, default=str))
    text = markdown(lines, settings)
    (args.out / "quality.md").write_text(text)
    return text


def acceptance(work: Path, variants: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Speculative decoding on the trained model (issue 11): the unquantized checkpoint as the target,
    each of `args.drafts` (a variant, or ngram) as its draft, K = args.draft_k fixed, greedy continuations
    of held-out prompts → acceptance rate and accepted tokens per verification, on the device's default
    ops (the fast path on CUDA). Written to OUT/acceptance.md; a draft that fails is a row with its error."""
    from ossq.engine.engine import EngineConfig
    from ossq.engine.load import load_model
    from ossq.engine.speculative import NGRAM, SpeculativeConfig, speculative_engine
    from ossq.tokenizer import o200k_harmony

    ids = o200k_harmony().encode((work / "heldout.txt").read_text(encoding="utf-8"))
    prompts = [ids[i * 997 : i * 997 + args.prompt_tokens] for i in range(args.prompts)]
    target = load_model(work / "model", device=args.device)[0]
    rows = []
    for name in args.drafts:
        try:
            draft = NGRAM if name == NGRAM else load_model(variants[name]["path"], device=args.device)[0]
            config = EngineConfig(kv_cache_tokens=4096, max_num_seqs=1)
            engine = speculative_engine(target, config, SpeculativeConfig(draft, args.draft_k, adaptive=False))
            for prompt in prompts:
                for _ in engine.stream(engine.add_request(prompt, max_tokens=args.gen_tokens)):
                    pass
            s = engine.speculator.stats
            rows.append({"draft": name, "acceptance": s.acceptance_rate, "accepted_per_step": s.mean_accepted_length})
        except Exception as e:  # noqa: BLE001 — a row, not the end of the run
            rows.append({"draft": name, "error": f"{type(e).__name__}: {e}"})
        print(f"acceptance {rows[-1]}", flush=True)
    head = f"{args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.gen_tokens} greedy"
    head += f", K = {args.draft_k}"
    text = [f"Speculative decoding on the small trained gpt-oss (target: unquantized); {head}", ""]
    text += ["| draft | acceptance | accepted / verification |", "|---|---|---|"]
    for r in rows:
        cells = (
            ("error: " + r["error"][:80], "")
            if "error" in r
            else (f"{r['acceptance']:.1%}", f"{r['accepted_per_step']:.2f}")
        )
        text.append(f"| {r['draft']} | {cells[0]} | {cells[1]} |")
    (args.out / "acceptance.md").write_text("\n".join(text) + "\n")
    return rows


def table(variants: dict[str, dict[str, Any]], rows: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    ref = rows.get(str(work / "model"), {})
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
    p.add_argument("--dwq-tokens", type=int, default=DWQ_TOKENS, help="calibration tokens of the -dwq rows")
    p.add_argument("--dwq-steps", type=int, default=DWQ_STEPS, help="distillation steps of the -dwq rows")
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the converted variants on disk")
    p.add_argument("--drafts", nargs="*", default=[], help="drafts to measure speculative acceptance with")
    p.add_argument("--draft-k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    args.start = time.perf_counter()
    variants, rows = run(args.work, names, args)
    print(write_table(variants, rows, args.work, args))
    if args.drafts:
        acceptance(args.work, variants, args)
    if not args.keep:
        shutil.rmtree(args.work / "variants", ignore_errors=True)


if __name__ == "__main__":
    main()
