"""The transformers baseline of benchmarks/RESULTS.md: `GptOssForCausalLM` in bfloat16 on the same
checkpoint, prompts and device as `ossq bench`, measured the way ossq bench measures a run.

    python benchmarks/transformers_baseline.py --hf-path SRC [--device cuda] [--context 2k] --json OUT.json

The MXFP4 experts are dequantized to bfloat16 at load (`Mxfp4Config(dequantize=True)`: the Triton MoE
kernels transformers would otherwise fetch from the hub are not reachable offline, and bfloat16 is the
reference everyone can run). One run = `generate` of `gen_tokens` greedy tokens with no stop; TTFT is a
run of one token, so generation tok/s = (gen_tokens − 1) / (run time − TTFT). Medians of `repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ossq.bench import prompt_ids
from ossq.lengths import parse_lengths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_s(model, ids: torch.Tensor, tokens: int) -> float:
    _sync(ids.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None)
    _sync(ids.device)
    return time.perf_counter() - start


def measure(model, prompt: list[int], gen_tokens: int, repeats: int, device: torch.device) -> dict[str, float]:
    ids = torch.tensor([prompt], device=device)
    _run_s(model, ids, 2)  # warm up
    ttft = statistics.median(_run_s(model, ids, 1) for _ in range(repeats))
    total = statistics.median(_run_s(model, ids, gen_tokens) for _ in range(repeats))
    return {
        "prompt_tokens": len(prompt),
        "prompt_tps": len(prompt) / ttft,
        "ttft_ms": ttft * 1e3,
        "generation_tps": (gen_tokens - 1) / (total - ttft),
    }


def main() -> None:
    from transformers import GptOssForCausalLM, Mxfp4Config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-path", required=True, help="a checkpoint in the published layout")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=90)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", default="", help="longer prompts measured too, e.g. 2k")
    ap.add_argument("--json", dest="json_path", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(
        args.hf_path, dtype=torch.bfloat16, device_map=str(device), quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    result = {"model": args.hf_path.rstrip("/").split("/")[-1], "dtype": "bfloat16", "load_s": load_s}
    with torch.inference_mode():
        result["main"] = measure(model, prompt_ids(args.prompt_tokens, vocab_size=vocab, seed=0), args.gen_tokens,
                                 args.repeats, device)  # fmt: skip
        result["contexts"] = {
            str(c): measure(model, prompt_ids(c, vocab_size=vocab, seed=0), args.gen_tokens, args.repeats, device)
            for c in parse_lengths(args.context)
        }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(json.dumps(result, indent=2))
    with open(args.json_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
