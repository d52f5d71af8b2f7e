"""What one request's tokens say, as the OpenAI APIs show it: content, reasoning, tool calls.

A harmony completion goes through `ossq.harmony.StreamParser`, and each piece of it is routed by its
message: a message to `functions.NAME` for a declared function is a tool call, whatever channel the
model put it on; the analysis channel, and messages to anything undeclared (the model reaching for a
tool it was not given), are reasoning; final and commentary (preambles) are content, and so is the text
of a completion that is not harmony at all. Nothing of a header or a special token reaches any of them.
A raw completion (POST /v1/completions) is all content.

Stop strings match the content only (never the reasoning), held back while a suffix of the content
could still begin one. Streaming and non-streaming responses are built from the same `Delta`s, so
they always agree.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from ossq.harmony import FUNCTIONS, Piece, StreamParser
from ossq.serve.worker import Logprob
from ossq.tokenizer import N_RANKS, Tokenizer

log = logging.getLogger("ossq.serve")


@dataclass(frozen=True)
class Delta:
    """New output: `kind` is "content", "reasoning", "call" (tool call `call` begins: its `name` and
    `call_id`) or "arguments" (more arguments of tool call `call`)."""

    kind: str
    text: str = ""
    call: int | None = None
    name: str | None = None
    call_id: str | None = None
    logprobs: tuple[Logprob, ...] = ()


@dataclass
class ToolCallOut:
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class Completion:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        harmony: bool,
        functions: frozenset[str] = frozenset(),
        stop: Sequence[str] = (),
        stop_tokens: frozenset[int] = frozenset(),
        prefill: Sequence[int] = (),
    ) -> None:
        """`functions`: the declared function names; `stop_tokens` end a raw completion and are not text;
        `prefill`: tokens the prompt already holds of the completion (a forced tool call's header)."""
        self.tokenizer, self.functions, self.stop_tokens = tokenizer, functions, stop_tokens
        self.parser = StreamParser() if harmony else None
        self._detok = None if harmony else tokenizer.detokenizer()
        self._stops = _StopStrings(stop)
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallOut] = []
        self.logprobs: list[Logprob] = []  # of the tokens that carry content
        self.tokens: list[int] = []  # generated, prefill excluded
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string matched: the rest is not wanted
        self._call_of: dict[int, int] = {}  # harmony message → its tool call
        self._warned: set[int] = set()
        self._prefill = list(prefill)
        self._opening = [d for t in prefill for d in self._route(self.parser.push(t), None)] if harmony else []

    def opening(self) -> list[Delta]:
        """What the prefill already says (a forced call's name), to be sent before the first token."""
        out, self._opening = self._opening, []
        return out

    def add(self, token: int, logprob: Logprob | None = None) -> list[Delta]:
        if self.stopped:
            return []
        self.tokens.append(token)
        if self.parser is None:
            text = "" if token in self.stop_tokens else self._detok.add(token)
            return self._route([Piece(text)] if text else [], logprob, carries=token not in self.stop_tokens)
        pieces = self.parser.push(token)
        if self._is_reasoning(self.parser.current()):
            self.reasoning_tokens += 1
        carries = token < N_RANKS and self._is_content(self.parser.current())
        return self._route(pieces, logprob, carries=carries)

    def finish(self, engine_reason: str) -> tuple[list[Delta], str]:
        """The generation ended for `engine_reason` → (the last deltas, OpenAI's finish_reason)."""
        deltas = []
        if not self.stopped:
            if self.parser is not None:
                deltas += self._route(self.parser.close(), None)
            else:
                tail = self._detok.flush()
                deltas += self._route([Piece(tail)] if tail else [], None)
            held = self._stops.flush()
            if held:
                self.content.append(held)
                deltas.append(Delta("content", held))
        self._log_if_malformed()
        if self.stopped:
            return deltas, "stop"
        if engine_reason == "length":
            return deltas, "length"
        return deltas, "tool_calls" if self.calls else "stop"

    # ---- results
    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    # ---- routing
    def _route(self, pieces: list[Piece], logprob: Logprob | None, *, carries: bool = False) -> list[Delta]:
        deltas: list[Delta] = []
        for piece in pieces:
            call = self._call(piece)
            if call is not None:
                deltas += self._call_deltas(piece, *call)
            elif self._is_reasoning(piece):
                if piece.text:
                    self.reasoning.append(piece.text)
                    deltas.append(Delta("reasoning", piece.text))
            elif piece.text:
                deltas += self._content(piece.text)
        if carries and logprob is not None and not self.stopped:
            self.logprobs.append(logprob)
            deltas = [Delta(d.kind, d.text, logprobs=(logprob,)) if d.kind == "content" else d for d in deltas]
            if not any(d.kind == "content" for d in deltas):
                deltas.append(Delta("content", "", logprobs=(logprob,)))  # a token ending mid character
        return deltas

    def _content(self, text: str) -> list[Delta]:
        if self.stopped:
            return []
        text, self.stopped = self._stops.feed(text)
        if text:
            self.content.append(text)
            return [Delta("content", text)]
        return []

    def _call(self, piece: Piece) -> tuple[int, bool] | None:
        """(the tool call this piece belongs to, whether it begins here), if it is one: a message to a
        declared function."""
        if piece.message is None or piece.recipient is None:
            return None
        if piece.message in self._call_of:
            return self._call_of[piece.message], False
        name = piece.recipient.removeprefix(FUNCTIONS)
        if not piece.recipient.startswith(FUNCTIONS) or name not in self.functions:
            if piece.message not in self._warned:
                self._warned.add(piece.message)
                log.debug("a message to the undeclared recipient %r is kept as reasoning", piece.recipient)
            return None
        self._call_of[piece.message] = len(self.calls)
        self.calls.append(ToolCallOut("call_" + secrets.token_hex(12), name))
        return len(self.calls) - 1, True

    def _call_deltas(self, piece: Piece, index: int, new: bool) -> list[Delta]:
        call = self.calls[index]
        deltas = [Delta("call", call=index, name=call.name, call_id=call.call_id)] if new else []
        if piece.text:
            call.arguments.append(piece.text)
            deltas.append(Delta("arguments", piece.text, call=index))
        return deltas

    def _is_reasoning(self, piece: Piece | None) -> bool:
        if piece is None or piece.message is None:
            return False
        if piece.recipient is not None:
            name = piece.recipient.removeprefix(FUNCTIONS)
            return not (piece.recipient.startswith(FUNCTIONS) and name in self.functions)
        return piece.channel == "analysis"

    def _is_content(self, piece: Piece | None) -> bool:
        if piece is None:
            return False
        return piece.message is None or (piece.recipient is None and piece.channel != "analysis")

    def _log_if_malformed(self) -> None:
        if self.parser is None or not log.isEnabledFor(logging.DEBUG):
            return
        reply = self.parser.reply()
        if reply.error or reply.truncated or reply.raw:
            raw = self.tokenizer.decode(self._prefill + self.tokens)
            log.debug("completion not well-formed harmony (%s): %r", reply.error or "truncated or raw", raw)


class _StopStrings:
    """Finds the first of `stops` in a stream of text, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text → (the text that is safe to emit, whether a stop string ended it)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
