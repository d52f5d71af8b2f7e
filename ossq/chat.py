"""Terminal chat: stream a harmony completion, reasoning and answer shown apart, with a stats line.

Text is printed as the tokens arrive. A completion that is not harmony (an untrained model's noise) is
recognised when no message body starts within `RAW_AFTER_TOKENS` tokens; from then on its raw text
streams as it comes. Every reply, well-formed or not, interrupted or not, goes into the history, so the
next turn's prompt holds what the model really said. In `interactive`, Ctrl-C during a reply stops that
reply only; at the prompt it clears the line, and a second Ctrl-C (or /exit, or end of input) leaves.
The prompt is read with `input()`, so readline gives line editing and history where Python has it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console

from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import format_stats, load, stream_generate
from ossq.engine.model import GptOss
from ossq.engine.sampling import SamplingParams
from ossq.engine.speculative import DEFAULT_NUM_DRAFT_TOKENS, SpeculativeConfig, load_draft, speculative_engine
from ossq.harmony import Chat, Reply, StreamParser
from ossq.tokenizer import Tokenizer

EXIT_COMMANDS = ("/exit", "/quit")
RAW_AFTER_TOKENS = 16  # a harmony header (channel, recipient, content type) is shorter than this
INTERRUPTED = "[interrupted]"


def load_for_chat(
    path: str | Path, *, device: str | None = None, ops: str | None = None, console: Console | None = None
) -> tuple[GptOss, Tokenizer]:
    console = console or Console(stderr=True)
    with console.status(f"loading {path}"):
        return load(path, device=device, ops=ops)


def engine_for_chat(
    model: GptOss,
    config: EngineConfig,
    *,
    draft_model: str | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    ops: str | None = None,
    console: Console | None = None,
) -> Engine:
    """The one engine a chat runs all its turns on, so each turn reuses the last from its prefix cache.
    With `draft_model` (a checkpoint with the model's tokenizer, loaded as the model was, or "ngram") it
    decodes speculatively (engine/speculative.py): the same tokens, and the stats line shows acceptance."""
    if draft_model is None:
        return Engine(model, config)
    console = console or Console(stderr=True)
    with console.status(f"loading {draft_model}"):
        draft = load_draft(draft_model, model, ops=ops)
    return speculative_engine(model, config, SpeculativeConfig(draft, num_draft_tokens))


class _Printer:
    """Shows a completion as it streams: each channel under its label (analysis dim, or hidden), and raw
    text once the tokens are evidently not harmony."""

    def __init__(self, console: Console, show_reasoning: bool) -> None:
        self.console = console
        self.show_reasoning = show_reasoning
        self.shown: str | None = None  # the label printed last
        self.pending: list[str] = []  # raw text since the last message body began
        self.raw = False

    def feed(self, channel: str | None, delta: str, text: str) -> None:
        if delta:
            self.pending.clear()
            if channel != "analysis" or self.show_reasoning:
                self._write(channel or "?", delta, dim=channel == "analysis")
            return
        self.pending.append(text)
        if self.raw or len(self.pending) > RAW_AFTER_TOKENS:
            self.raw = True
            self._write("raw, not harmony", "".join(self.pending))
            self.pending.clear()

    def _write(self, label: str, text: str, *, dim: bool = False) -> None:
        if label != self.shown:
            self.console.print(f"\n[{label}]" if self.shown else f"[{label}]", style="bold", markup=False)
            self.shown = label
        self.console.print(text, end="", style="dim" if dim else None, markup=False, highlight=False)

    def finish(self) -> None:
        """A short completion that never became harmony: show the raw text it held back."""
        if self.shown is None and "".join(self.pending).strip():
            self._write("raw, not harmony", "".join(self.pending))
        self.console.print()


def answer(
    model: GptOss,
    tokenizer: Tokenizer,
    chat: Chat,
    *,
    sampling: SamplingParams,
    max_tokens: int,
    max_kv_size: int | None = None,
    engine: Engine | None = None,
    show_reasoning: bool = True,
    console: Console | None = None,
    catch_interrupt: bool = True,
) -> Reply:
    """Generate the assistant's next turn, print it as it streams, and append it to `chat`.

    With `catch_interrupt`, Ctrl-C (KeyboardInterrupt) stops the reply: what was generated is kept,
    printed and added to the history, followed by "[interrupted]"; otherwise it propagates after that.
    Pass the same `engine` for every turn and each prompt reuses the one before from its prefix cache."""
    console = console or Console(highlight=False)
    parser, printer = StreamParser(), _Printer(console, show_reasoning)
    raw: list[str] = []
    response = None
    interrupted: KeyboardInterrupt | None = None
    stream = stream_generate(
        model,
        tokenizer,
        chat.prompt_tokens(),
        max_tokens=max_tokens,
        sampling=sampling,
        max_kv_size=max_kv_size,
        engine=engine,
    )
    with contextlib.closing(stream):
        try:
            for response in stream:
                raw.append(response.text)
                channel, delta = parser.feed(response.token)
                printer.feed(channel, delta, response.text)
        except KeyboardInterrupt as e:
            interrupted = e
    printer.finish()
    if interrupted is not None:
        console.print(INTERRUPTED, style="yellow", markup=False)
    if response is not None:
        console.print(format_stats(response.stats), style="cyan", markup=False)
    reply = _kept(parser.reply(), "".join(raw))
    chat.add_assistant(reply)
    if interrupted is not None and not catch_interrupt:
        raise interrupted
    return reply


def _kept(reply: Reply, raw_text: str) -> Reply:
    """The reply as the history keeps it: parsed, or — when nothing parsed as harmony — its raw text as
    the final answer, so the next prompt still holds what the model said."""
    if reply.messages or reply.analysis or reply.final or reply.tool_calls or not raw_text.strip():
        return reply
    return Reply(analysis="", final=raw_text, truncated=reply.truncated, error=reply.error)


def _enable_line_editing() -> None:
    """Up-arrow history and line editing for `input()`, where Python has readline (not on Windows)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what turns editing on)


def _prompt(console: Console) -> str:
    """The `>>> ` prompt, bold green on a colour terminal; readline needs the escapes marked zero-width."""
    if console.is_terminal and not console.no_color:
        return "\001\033[1;32m\002>>> \001\033[0m\002"
    return ">>> "


def interactive(
    model: GptOss, tokenizer: Tokenizer, chat: Chat, *, console: Console | None = None, **answer_kwargs
) -> None:
    """Read user turns until /exit, end of input or a second Ctrl-C; each answer keeps the history."""
    console = console or Console(highlight=False)
    _enable_line_editing()
    console.print("Type a message; /exit, Ctrl-D or Ctrl-C twice to leave. Ctrl-C stops a reply.", style="bold")
    armed = False  # the previous prompt ended in Ctrl-C
    while True:
        try:
            text = input(_prompt(console))
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            if armed:
                return
            armed = True
            console.print("(Ctrl-C again, /exit or Ctrl-D to leave)", style="dim", markup=False)
            continue
        armed = False
        if text.strip() in EXIT_COMMANDS:
            return
        if text.strip():
            chat.add_user(text)
            answer(model, tokenizer, chat, console=console, catch_interrupt=True, **answer_kwargs)
