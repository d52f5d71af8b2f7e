"""Terminal chat: stream a harmony completion, reasoning and answer shown apart, with a stats line."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ossq.engine.generate import format_stats, load, stream_generate
from ossq.engine.model import GptOss
from ossq.engine.sampling import SamplingParams
from ossq.harmony import Chat, Reply, StreamParser
from ossq.tokenizer import Tokenizer

EXIT_COMMANDS = ("/exit", "/quit")


def load_for_chat(
    path: str | Path, *, device: str | None = None, console: Console | None = None
) -> tuple[GptOss, Tokenizer]:
    console = console or Console(stderr=True)
    with console.status(f"loading {path}"):
        return load(path, device=device)


def answer(
    model: GptOss,
    tokenizer: Tokenizer,
    chat: Chat,
    *,
    sampling: SamplingParams,
    max_tokens: int,
    max_kv_size: int | None = None,
    show_reasoning: bool = True,
    console: Console | None = None,
) -> Reply:
    """Generate the assistant's next turn, print it as it streams, and append it to `chat`."""
    console = console or Console(highlight=False)
    parser = StreamParser()
    shown = None
    response = None
    raw = []
    for response in stream_generate(
        model, tokenizer, chat.prompt_tokens(), max_tokens=max_tokens, sampling=sampling, max_kv_size=max_kv_size
    ):
        raw.append(response.text)
        channel, delta = parser.feed(response.token)
        if not delta or (channel == "analysis" and not show_reasoning):
            continue
        if channel != shown:
            console.print(f"\n[{channel}]" if shown else f"[{channel}]", style="bold", markup=False)
            shown = channel
        console.print(delta, end="", style="dim" if channel == "analysis" else None, markup=False)
    if shown is None and raw:  # nothing parsed as harmony (e.g. an untrained model): show what it said
        console.print("[raw, not harmony]", style="bold", markup=False)
        console.print("".join(raw), end="", markup=False)
    console.print()
    if response is not None:
        console.print(format_stats(response.stats), style="cyan", markup=False)
    reply = parser.reply()
    chat.add_assistant(reply)
    return reply


def interactive(
    model: GptOss, tokenizer: Tokenizer, chat: Chat, *, console: Console | None = None, **answer_kwargs
) -> None:
    """Read user turns until /exit or end of input; each answer keeps the conversation's history."""
    console = console or Console(highlight=False)
    console.print("Type a message; /exit to leave.", style="bold")
    while True:
        try:
            text = console.input("[bold green]>>> [/]")
        except EOFError:
            return
        if text.strip() in EXIT_COMMANDS:
            return
        if text.strip():
            chat.add_user(text)
            answer(model, tokenizer, chat, console=console, **answer_kwargs)
