"""`ossq quickstart`: prove an install end to end with no download — synthesize a tiny gpt-oss in the
published layout (cached), load it, and chat with it in the harmony format."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ossq.chat import answer, interactive, load_for_chat
from ossq.engine.sampling import SamplingParams
from ossq.harmony import Chat
from ossq.synth import synthesize
from ossq.tokenizer import cache_dir as default_cache_dir

QUESTION = "What is the capital of France?"


def quickstart(*, cache_dir: Path | None = None, interactive_chat: bool = False) -> None:
    console = Console(highlight=False)
    root = (cache_dir or default_cache_dir()) / "quickstart"
    model_dir = root / "tiny"
    if not model_dir.exists():
        with console.status("synthesizing a tiny gpt-oss checkpoint"):
            synthesize(model_dir, config="tiny", seed=0)
    console.print(f"tiny gpt-oss (random weights) at {model_dir}", style="bold")
    model, tokenizer = load_for_chat(model_dir, device="cpu")
    console.print("Its weights are random, so the text is noise: this checks the pipeline, not the model.")
    chat = Chat(reasoning_effort="low")
    chat.add_user(QUESTION)
    console.print(f">>> {QUESTION}", style="bold green")
    answer(model, tokenizer, chat, sampling=SamplingParams(temperature=0.8, seed=0), max_tokens=32, console=console)
    if interactive_chat:
        interactive(model, tokenizer, chat, console=console, sampling=SamplingParams(temperature=0.8), max_tokens=128)
