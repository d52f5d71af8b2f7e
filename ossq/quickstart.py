"""`ossq quickstart`: the whole job end to end, with no download — synthesize a tiny gpt-oss in the published
layout, chat with it in the harmony format, convert it to 4-bit MLX format and chat with that, then bench
and score both side by side. Everything is cached under the ossq cache directory."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from rich.console import Console

from ossq.bench import bench
from ossq.chat import answer, load_for_chat
from ossq.convert import convert
from ossq.engine.sampling import SamplingParams
from ossq.harmony import Chat
from ossq.perplexity import perplexity
from ossq.report import print_report
from ossq.synth import synthesize
from ossq.tokenizer import cache_dir as default_cache_dir

QUESTION = "What is the capital of France?"


def quickstart(*, cache_dir: Path | None = None, interactive_chat: bool = False) -> None:
    console = Console(highlight=False)
    root = (cache_dir or default_cache_dir()) / "quickstart"
    source, quantized = root / "tiny", root / "tiny-4bit"
    if not source.exists():
        with console.status("synthesizing a tiny gpt-oss checkpoint"):
            synthesize(source, config="tiny", seed=0)
    _title(
        console,
        "1. chat with the tiny model",
        f"{source}; random weights: the text is noise, the pipeline is what is checked",
    )
    _ask(source, console)
    if not quantized.exists():
        _title(console, "2. convert to MLX format", "4-bit, group 64, experts included")
        convert(source, quantized, quantize=True, q_bits=4, q_group_size=64, experts="quantize", console=console)
    _title(console, "3. chat with the 4-bit model", str(quantized))
    model, tokenizer, chat = _ask(quantized, console)
    _title(console, "4. bench: speed side by side")
    bench([str(source), str(quantized)], prompt_tokens=32, gen_tokens=16, repeats=2, warmup=1, device="cpu")
    _title(console, "5. perplexity", "and KL of the 4-bit model against the original")
    text = root / "sample-text.txt"  # English prose every Python carries: a few standard modules' docs
    text.write_text("\n\n".join(m.__doc__ or "" for m in (argparse, json, textwrap)))
    result = perplexity(
        [str(source), str(quantized)],
        data=str(text),
        window=64,
        max_tokens=4096,
        kl_reference=str(source),
        reference=str(source),
        device="cpu",
        progress=False,
    )
    print_report(result.report, console=console)
    if interactive_chat:
        from ossq.chat import interactive

        interactive(model, tokenizer, chat, console=console, sampling=SamplingParams(temperature=0.8), max_tokens=128)


def _title(console: Console, title: str, detail: str | None = None) -> None:
    """A short rule (a long one is cut off with an ellipsis on a narrow terminal), the detail below it."""
    console.rule(title)
    if detail:
        console.print(detail, style="dim", markup=False)


def _ask(path: Path, console: Console):
    model, tokenizer = load_for_chat(path, device="cpu")
    chat = Chat(reasoning_effort="low")
    chat.add_user(QUESTION)
    console.print(f">>> {QUESTION}", style="bold green")
    answer(model, tokenizer, chat, sampling=SamplingParams(temperature=0.8, seed=0), max_tokens=24, console=console)
    return model, tokenizer, chat
