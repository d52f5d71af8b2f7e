"""Engine benchmark: what continuous batching and the prefix cache buy, measured in one run.

    python benchmarks/engine.py -m CHECKPOINT [--device cpu|cuda] [--concurrency 1,4,16,64]
        [--prompt-tokens 90] [--gen-tokens 32] [--turns 6] [--markdown OUT.md] [--json OUT.json]

1. Concurrency: N requests (distinct seeded prompts, greedy, no stop) run at once on one engine, against
   the same requests run one after another on the same engine (the first `--sequential-sample` of them:
   one at a time, the rate does not depend on how many); generation tok/s of both, counted over the
   whole run (prefill included), and the speed-up.
2. Multi-turn chat: `turns` turns of a harmony chat (each reply fed back, a new user message each turn)
   with the prefix cache on and off: prompt tokens computed, cached, and the wall time of all turns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from ossq.bench import parse_lengths, prompt_ids
from ossq.device import resolve_device
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import batch_generate, load, stream_generate
from ossq.harmony import Chat, parse_reply
from ossq.report import system_info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def concurrency(
    model, tokenizer, sizes: list[int], prompt_tokens: int, gen_tokens: int, sequential_sample: int
) -> list[dict]:
    engine = Engine(model, EngineConfig(max_num_seqs=max(sizes), prefix_cache=False))
    vocab = model.config.vocab_size
    rows = []
    for n in sizes:
        prompts = [prompt_ids(prompt_tokens, vocab_size=vocab, seed=i) for i in range(n)]
        batch_generate(model, tokenizer, prompts[:1], max_tokens=2, stop_tokens=(), engine=engine)  # warm-up
        sync(model.device)
        t0 = time.perf_counter()
        batch_generate(model, tokenizer, prompts, max_tokens=gen_tokens, stop_tokens=(), engine=engine)
        sync(model.device)
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = prompts[:sequential_sample]  # one after another, the rate does not depend on how many
        for p in alone:
            batch_generate(model, tokenizer, [p], max_tokens=gen_tokens, stop_tokens=(), engine=engine)
        sync(model.device)
        sequential = len(alone) * gen_tokens / (time.perf_counter() - t0)
        concurrent = n * gen_tokens / together
        rows.append(
            {
                "sequences": n,
                "concurrent_tps": concurrent,
                "sequential_tps": sequential,
                "sequential_measured_on": len(alone),
                "speedup": concurrent / sequential,
            }
        )
        print(f"{n:>4} sequences: {concurrent:9.1f} tok/s together, {sequential:9.1f} one by one")
    return rows


def chat(model, tokenizer, turns: int, gen_tokens: int, prefix_cache: bool) -> dict:
    engine = Engine(model, EngineConfig(prefix_cache=prefix_cache))
    Chat().prompt_tokens()  # load the harmony encoding before the clock starts
    conversation = Chat(reasoning_effort="low")
    computed = cached = prompt_total = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        conversation.add_user(f"Turn {turn}: tell me one more fact about the number {turn * 7 + 3}, please.")
        ids = conversation.prompt_tokens()
        before = engine.stats.computed_tokens
        tokens, last = [], None
        for r in stream_generate(model, tokenizer, ids, max_tokens=gen_tokens, engine=engine):
            tokens.append(r.token)
            last = r
        conversation.add_assistant(parse_reply(tokens))
        prompt_total += len(ids)
        cached += last.stats.cached_tokens
        computed += engine.stats.computed_tokens - before - (len(tokens) - 1)  # prompt positions only
    sync(model.device)
    return {
        "prefix_cache": prefix_cache,
        "turns": turns,
        "prompt_tokens": prompt_total,
        "computed": computed,
        "cached": cached,
        "seconds": time.perf_counter() - t0,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"## Engine benchmark — {result['date']}",
        "",
        f"- device: {result['device']}; model: `{s['model']}`; command: `{result['command']}`",
        f"- prompts of {s['prompt_tokens']} tokens, {s['gen_tokens']} generated each, greedy, no stop",
        "",
        "| sequences | concurrent (tok/s) | one after another (tok/s) | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["concurrency"]:
        lines.append(
            f"| {r['sequences']} | {r['concurrent_tps']:,.1f} | {r['sequential_tps']:,.1f} | {r['speedup']:.2f}× |"
        )
    lines += [
        "",
        f"Multi-turn chat, {s['turns']} turns:",
        "",
        "| prefix cache | prompt tokens | computed | cached | time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["chat"]:
        lines.append(
            f"| {'on' if r['prefix_cache'] else 'off'} | {r['prompt_tokens']:,} | {r['computed']:,} | "
            f"{r['cached']:,} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _describe(device: torch.device) -> str:
    info = system_info(str(device))
    if device.type == "cuda":
        return f"{info['gpu']['name']} (torch {info['torch']})"
    return f"{info['cpu']}, {info['cores']} cores (torch {info['torch']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--sequential-sample", type=int, default=16, help="requests timed one after another")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    device = resolve_device(a.device)
    model, tokenizer = load(a.model, device=str(device))
    sizes = parse_lengths(a.concurrency)
    chat(model, tokenizer, 2, 2, True)  # warm-up: the first chat run pays one-time costs
    result = {
        "date": datetime.date.today().isoformat(),
        "device": _describe(device),
        "command": "python benchmarks/engine.py "
        + " ".join(
            f"--{k.replace('_', '-')} {Path(v).name if k == 'model' else v}"  # no path of this machine
            for k, v in vars(a).items()
            if v is not None and k not in ("markdown", "json")
        ),
        "settings": {
            "model": Path(a.model).name,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "turns": a.turns,
        },
        "concurrency": concurrency(model, tokenizer, sizes, a.prompt_tokens, a.gen_tokens, a.sequential_sample),
        "chat": [chat(model, tokenizer, a.turns, a.gen_tokens, cache) for cache in (True, False)],
    }
    text = markdown(result)
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
