"""Speculative decoding at batch 1: each target decodes the same prompt without speculation and then with
each drafter (n-gram prompt lookup, and its own 3-bit and 2-bit conversions), greedy, so every run
generates the same tokens; the table gives tok/s of both, the speed-up, the acceptance and the tokens
drafted and accepted per verification. Optionally (--with-120b) a 120b under the tiered recipe, built
in memory (ossq.synth.random_quantized_model: its 65 GB source does not fit the disk), drafted by the
20b target.

    python benchmarks/speculative_bench.py --work /tmp/ossq-spec --out OUT [--with-120b] [--tiny]

The 20b is synthesized in the published layout (ossq.synth.synthesize) and converted by ossq.convert:
the targets MXFP4 experts + 8-bit rest, and 4-bit (experts too); the drafts 3-bit and 2-bit (experts
too), all group 64. The weights are random, so acceptance is not what a trained model gets: a
conversion's drafts agree with its source only as far as the rounding leaves the random logits' order,
a 20b shares nothing with a random 120b, and random text rarely repeats for the n-gram drafter. The
speeds, and what the drafts cost, hold. `--tiny` runs the same on the tiny preset (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from ossq.bench import kv_tokens_needed, measure, measure_speculative, prompt_ids
from ossq.convert import convert
from ossq.device import MemoryMeter
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import load
from ossq.engine.model import GptOss
from ossq.engine.speculative import NGRAM, load_draft
from ossq.quant.recipe import resolve
from ossq.synth import random_quantized_model, synthesize

# name → convert's arguments (all from the one synthesized source)
TARGETS = {"mxfp4+q8": dict(q_bits=8), "q4": dict(q_bits=4, experts="quantize")}
DRAFTS = {"q3": dict(q_bits=3, experts="quantize"), "q2": dict(q_bits=2, experts="quantize")}
NOTE = (
    "Random weights: acceptance is not representative of a trained model (module docstring); the speeds "
    "and the cost of drafting are."
)


def main() -> None:
    args = _parser().parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    preset = "tiny" if args.tiny else "20b"
    source = Path(args.source) if args.source else Path(args.work) / f"{preset}-src"
    paths = _checkpoints(source, Path(args.work), preset, args.device, times)
    rows = []
    for name in TARGETS:
        model, _ = load(paths[name], device=args.device)
        rows += _target_rows(name, model, {NGRAM: NGRAM, **{d: paths[d] for d in DRAFTS}}, args)
        del model
        _free(args.device)
    if args.with_120b:
        start = time.perf_counter()
        model = random_quantized_model("tiny" if args.tiny else "120b", resolve("tiered"), device=args.device)
        times["build 120b tiered in memory"] = time.perf_counter() - start
        rows += _target_rows("120b tiered", model, {NGRAM: NGRAM, "20b mxfp4+q8": paths["mxfp4+q8"]}, args)
    (out / "speculative.json").write_text(json.dumps({"rows": rows, "times_s": times, "args": vars(args)}, indent=2))
    (out / "speculative.md").write_text(_markdown(rows, times, args))
    print((out / "speculative.md").read_text())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="where the converted checkpoints go (reused when there)")
    ap.add_argument("--source", default=None, help="where the synthesized source goes (default: under --work)")
    ap.add_argument("--out", required=True, help="directory for speculative.md and speculative.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=90)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--num-draft-tokens", type=lambda t: [int(k) for k in t.split(",")], default=[2, 4])
    ap.add_argument("--with-120b", action="store_true", help="also the 120b (tiered, in memory), 20b drafting")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset for both sizes: a quick CPU check")
    ap.add_argument("--fixed-k", action="store_true", help="draft K tokens every step (no adaptive K): the cost")
    return ap


def _checkpoints(source: Path, work: Path, preset: str, device: str, times: dict[str, float]) -> dict[str, Path]:
    """Every conversion of the synthesized source, each made (and the source) unless already there."""
    if not source.exists():
        times[f"synthesize {preset}"] = _timed(synthesize, source, config=preset, device=device)
    paths = {}
    for name, flags in {**TARGETS, **DRAFTS}.items():
        paths[name] = work / f"{preset}-{name}"
        if not paths[name].exists():
            times[f"convert {name}"] = _timed(
                convert, source, paths[name], quantize=True, q_group_size=64, device=device, **flags
            )
    return paths


def _target_rows(name: str, model: GptOss, drafts: dict[str, str | Path], args) -> list[dict]:
    """The plain run and each (drafter, K) run of one target, as table rows."""
    meter = MemoryMeter(model.device)
    counts = dict(gen_tokens=args.gen_tokens, repeats=args.repeats, warmup=args.warmup)
    config = EngineConfig(
        kv_cache_tokens=kv_tokens_needed(args.prompt_tokens, args.gen_tokens + max(args.num_draft_tokens), [], []),
        max_num_seqs=1,
        prefix_cache=False,
    )
    prompt = prompt_ids(args.prompt_tokens, vocab_size=model.config.vocab_size, seed=0)
    plain = measure(Engine(model, config), prompt, meter=meter, **counts).generation_tps.median
    _free(args.device)
    rows = [{"target": name, "draft": "—", "k": 0, "tps": plain}]
    for label, path in drafts.items():
        draft = load_draft(str(path), model)
        for k in args.num_draft_tokens:
            spec = measure_speculative(
                model, draft, config, prompt, k, meter=meter, adaptive=not args.fixed_k, **counts
            )
            tps, d = spec.run.generation_tps.median, spec.drafts
            step_cost = plain * (1 + d.mean_accepted_length) / tps  # a drafting step, in plain decode steps
            rows.append({"target": name, "draft": label, "k": k, "tps": tps, "speedup": tps / plain,
                         "acceptance": d.acceptance_rate, "accepted_per_step": d.mean_accepted_length,
                         "drafted_per_step": d.mean_draft_length, "step_cost": step_cost})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del draft
        _free(args.device)
    return rows


def _markdown(rows: list[dict], times: dict[str, float], args) -> str:
    head = (
        "| target | draft | K (cap) | tok/s | speed-up | acceptance | accepted / step | drafted / step "
        "| step cost (plain steps) |"
    )
    lines = [
        f"# Speculative decoding, batch 1 ({args.device})",
        "",
        f"{args.prompt_tokens}-token seeded random prompt, {args.gen_tokens} tokens greedy (the same tokens "
        f"with and without drafts), median of {args.repeats} after {args.warmup} warmup; "
        + ("K fixed (drafts every step)." if args.fixed_k else "adaptive K."),
        "",
        NOTE,
        "",
        head,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["k"] == 0:
            lines.append(f"| {r['target']} | none | — | {r['tps']:.1f} | 1.00 | — | — | — | 1.00 |")
        else:
            lines.append(
                f"| {r['target']} | {r['draft']} | {r['k']} | {r['tps']:.1f} | {r['speedup']:.2f} | "
                f"{r['acceptance']:.0%} | {r['accepted_per_step']:.2f} | {r['drafted_per_step']:.2f} | "
                f"{r['step_cost']:.2f} |"
            )
    lines += ["", "Preparation: " + (", ".join(f"{k} {v:.1f} s" for k, v in times.items()) or "reused"), ""]
    return "\n".join(lines)


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
