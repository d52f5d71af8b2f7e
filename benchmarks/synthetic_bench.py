"""`ossq bench`'s measurements on a model that never touches the disk: random codes drawn straight into
the quantized layout of a recipe on the device (ossq.synth.random_quantized_model). This is how
gpt-oss-120b is measured on a GPU machine whose 64 GiB disk cannot hold its 65 GB source checkpoint.

    python benchmarks/synthetic_bench.py --preset 120b --recipe tiered --context 2k --json OUT.json

Same method as `ossq bench` (docs/measure.md): seeded random prompts, greedy, no stop, median of
`repeats` after `warmup`; the bytes a decode step reads are counted from the built model and the copy
bandwidth is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ossq.bench import (
    copy_bandwidth_gbps,
    decode_bytes_per_token,
    kv_tokens_needed,
    measure,
    prompt_ids,
    time_batch,
)
from ossq.device import MemoryMeter
from ossq.engine.engine import Engine, EngineConfig
from ossq.lengths import parse_lengths
from ossq.quant.recipe import plan, resolve
from ossq.synth import random_quantized_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="120b")
    ap.add_argument("--recipe", default="tiered")
    ap.add_argument("--q-bits", type=int, default=None)
    ap.add_argument("--q-group-size", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=90)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", default=None)
    ap.add_argument("--batch", default=None)
    ap.add_argument("--json", dest="json_path", required=True)
    args = ap.parse_args()
    recipe = resolve(args.recipe, bits=args.q_bits, group_size=args.q_group_size)
    device = torch.device(args.device)
    meter = MemoryMeter(device)
    meter.reset()
    start = time.perf_counter()
    model = random_quantized_model(args.preset, recipe, device=args.device)
    build_s = time.perf_counter() - start
    stored = plan(recipe, model.config)
    contexts, sizes = parse_lengths(args.context), parse_lengths(args.batch)
    kv = kv_tokens_needed(args.prompt_tokens, args.gen_tokens, contexts, sizes)
    engine = Engine(model, EngineConfig(kv_cache_tokens=kv, max_num_seqs=max([1, *sizes]), prefix_cache=False))
    vocab = model.config.vocab_size

    def run(n: int) -> dict[str, float]:
        stats = measure(engine, prompt_ids(n, vocab_size=vocab, seed=0), gen_tokens=args.gen_tokens,
                        repeats=args.repeats, warmup=1, meter=meter)  # fmt: skip
        return {"prompt_tokens": n, "prompt_tps": stats.prompt_tps.median, "ttft_ms": 1e3 * n / stats.prompt_tps.median,
                "generation_tps": stats.generation_tps.median, "peak_memory_gb": stats.peak_memory_gb}  # fmt: skip

    result = {
        "preset": args.preset,
        "recipe": recipe.name,
        "bits_per_weight": stored.bits_per_weight,
        "weights_gb": stored.total_bytes / 1e9,
        "build_s": build_s,
        "ops": model.ops.name,
        "main": run(args.prompt_tokens),
        "contexts": {str(c): run(c) for c in contexts},
    }
    batches = {}
    for size in sizes:
        prompts = [prompt_ids(args.prompt_tokens, vocab_size=vocab, seed=i) for i in range(size)]
        time_batch(engine, prompts, args.gen_tokens)
        batches[str(size)] = sorted(time_batch(engine, prompts, args.gen_tokens) for _ in range(args.repeats))[
            args.repeats // 2
        ]
    result["batch_aggregate_tps"] = batches
    gbps = copy_bandwidth_gbps(device)
    read = decode_bytes_per_token(model, args.prompt_tokens + args.gen_tokens / 2)
    result |= {"bytes_per_token": read, "copy_bandwidth_gbps": gbps}
    result["bandwidth_pct"] = 100 * read * result["main"]["generation_tps"] / (gbps * 1e9)
    print(json.dumps(result, indent=2))
    with open(args.json_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
