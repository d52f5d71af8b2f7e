"""The harmony chat format of gpt-oss: render prompts (through openai-harmony), stop, parse channels.

openai-harmony downloads its vocabulary unless `TIKTOKEN_ENCODINGS_BASE` names a directory holding
`o200k_base.tiktoken`; `encoding()` points it at ossq's verified local copy (spec offline.md §1).
Token ids and grammar: spec formats.md §6, harmony's docs/format.md.

Parsing is ossq's own (`StreamParser`), not openai-harmony's: that parser stops at the first token it
does not expect ("unexpected tokens remaining in message header") and loses the rest of the completion.
Models break the grammar in a handful of ways — junk in a header, the recipient in the role part, a
tool call on the analysis channel, a message never closed, text after the end — and each of these
degrades here to the messages the model evidently meant, with `Reply.error` saying what was wrong.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

from ossq.errors import OssqError, TokenizerError
from ossq.tokenizer import N_RANKS, NAMED_SPECIALS, o200k_harmony, o200k_ranks_dir

RETURN = NAMED_SPECIALS["<|return|>"]  # ends the final answer
CONSTRAIN = NAMED_SPECIALS["<|constrain|>"]  # starts a content type in a header
CHANNEL = NAMED_SPECIALS["<|channel|>"]  # starts the channel in a header
START = NAMED_SPECIALS["<|start|>"]  # starts a message
END = NAMED_SPECIALS["<|end|>"]  # ends a message inside a completion: never a stop
MESSAGE = NAMED_SPECIALS["<|message|>"]  # header → content
CALL = NAMED_SPECIALS["<|call|>"]  # ends a tool call
ENDOFTEXT = NAMED_SPECIALS["<|endoftext|>"]  # HF's generation_config also stops on it; the parser ignores it
STOP_TOKENS = (RETURN, CALL)
REASONING_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}
CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS = "functions."  # recipient prefix of function tools
JSON_TYPE = "<|constrain|>json"  # the content type of a function call's arguments
HEADER_MAX_TOKENS = 32  # a real header (channel, recipient, content type) is far shorter: past this, not harmony


@functools.cache
def encoding() -> HarmonyEncoding:
    """The HARMONY_GPT_OSS encoding, loaded offline (sets TIKTOKEN_ENCODINGS_BASE unless the user did)."""
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(o200k_ranks_dir()))
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        raise TokenizerError(
            f"openai-harmony could not load o200k_base from TIKTOKEN_ENCODINGS_BASE="
            f"{os.environ['TIKTOKEN_ENCODINGS_BASE']}: {e}"
        ) from e


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: `name` without the `functions.` prefix, `arguments` as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Reply:
    """One assistant completion, split by channel.

    `analysis` and `final` concatenate the text of every message on that channel that is not a tool
    call; `tool_calls` are the messages with a recipient, on whatever channel the model used.
    `messages` are the assistant's harmony messages (the last one partial when `truncated`), fed back
    by `Chat.add_assistant`. `raw`: the text of a completion that is not harmony at all (no message
    header within HEADER_MAX_TOKENS tokens, or none before it ended). `truncated`: the tokens ended
    inside a header or a message (e.g. max_tokens). `error`: how the model broke the grammar, if it did.
    """

    analysis: str
    final: str
    tool_calls: tuple[ToolCall, ...] = ()
    messages: tuple[Message, ...] = ()
    truncated: bool = False
    error: str | None = None
    raw: str = ""


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output as harmony states it: a `# Response Formats` section at the end of the
    developer message (harmony docs/format.md, "Structured output"). It steers the final answer only."""

    name: str
    schema: dict
    description: str | None = None

    def text(self) -> str:
        comment = f"// {self.description}\n" if self.description else ""
        return f"# Response Formats\n\n## {self.name}\n\n{comment}{json.dumps(self.schema)}"


class Chat:
    """A multi-turn harmony conversation, rendered for the assistant's next completion.

    `system` replaces harmony's default model identity line; `developer` becomes `# Instructions`;
    `tools` are OpenAI-style function specs (`{"name", "description", "parameters"}`, optionally wrapped
    as `{"type": "function", "function": {...}}`); `response_format` closes the developer message.
    """

    def __init__(
        self,
        system: str | None = None,
        developer: str | None = None,
        *,
        reasoning_effort: str = "medium",
        tools: Sequence[dict] | None = None,
        response_format: ResponseFormat | None = None,
    ) -> None:
        if reasoning_effort not in REASONING_EFFORTS:
            raise OssqError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
        content = SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[reasoning_effort])
        if system is not None:
            content = content.with_model_identity(system)
        self._messages = [Message.from_role_and_content(Role.SYSTEM, content)]
        self.response_format = response_format
        if developer is not None or tools or response_format:
            self._messages.append(Message.from_role_and_content(Role.DEVELOPER, _developer(developer, tools)))

    @property
    def messages(self) -> tuple[Message, ...]:
        """Every message so far (system first), analysis included."""
        return tuple(self._messages)

    def add_user(self, text: str) -> None:
        self._messages.append(Message.from_role_and_content(Role.USER, text))

    def add_reasoning(self, text: str) -> None:
        """The assistant's chain of thought (analysis channel)."""
        self._messages.append(_assistant(text, "analysis"))

    def add_preamble(self, text: str) -> None:
        """Assistant text for the user before its tool calls (commentary channel, no recipient)."""
        self._messages.append(_assistant(text, "commentary"))

    def add_answer(self, text: str) -> None:
        """The assistant's final answer (final channel); it ends the turn."""
        self._messages.append(_assistant(text, "final"))

    def add_tool_call(self, name: str, arguments: str) -> None:
        """A call of function `name` with JSON `arguments`, as harmony writes one (commentary channel)."""
        message = _assistant(arguments, "commentary").with_recipient(FUNCTIONS + name)
        self._messages.append(message.with_content_type(JSON_TYPE))

    def add_assistant(self, reply: Reply) -> None:
        """Append a completion: its parsed messages, or ones built from its fields if it has none."""
        if reply.messages:
            self._messages.extend(reply.messages)
            return
        if reply.analysis:
            self.add_reasoning(reply.analysis)
        if reply.final and reply.tool_calls:
            self.add_preamble(reply.final)  # text beside tool calls is said before them; the turn goes on
        for call in reply.tool_calls:
            self.add_tool_call(call.name, call.arguments)
        if reply.final and not reply.tool_calls:
            self.add_answer(reply.final)

    def add_tool_result(self, name: str, content: str) -> None:
        """The output of function `name`, as the `functions.NAME` tool's message to the assistant."""
        author = Author.new(Role.TOOL, FUNCTIONS + name)
        message = Message.from_author_and_content(author, content)
        self._messages.append(message.with_channel("commentary").with_recipient("assistant"))

    def prompt_tokens(self) -> list[int]:
        """Token ids ending in `<|start|>assistant`, with the analysis of finished turns dropped.

        A turn is finished once the assistant answered on the final channel; analysis after the last
        final answer (the current turn, e.g. across tool calls) is kept. openai-harmony 0.0.8's own
        auto-drop only removes analysis before the *first* final answer, so we drop it here.
        """
        conversation = Conversation.from_messages(_drop_finished_analysis(self._messages))
        no_auto_drop = RenderConversationConfig(auto_drop_analysis=False)
        ids = encoding().render_conversation_for_completion(conversation, Role.ASSISTANT, no_auto_drop)
        return ids if self.response_format is None else _close_developer(ids, self.response_format)


def render_prompt(user: str, **chat_kwargs) -> list[int]:
    """Prompt ids for a single user message; `chat_kwargs` as for `Chat`."""
    chat = Chat(**chat_kwargs)
    chat.add_user(user)
    return chat.prompt_tokens()


def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def _developer(instructions: str | None, tools: Sequence[dict] | None) -> DeveloperContent:
    content = DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([_tool_description(spec) for spec in tools])
    return content


def _close_developer(ids: list[int], response_format: ResponseFormat) -> list[int]:
    """Append the response format to the developer message (the first message after the system one), as
    harmony places it: at its end. The message's text is encoded again as a whole, so its tokens are
    those of one text, as if harmony had rendered the section itself."""
    developer = ids.index(START, ids.index(END) + 1)
    body, end = ids.index(MESSAGE, developer) + 1, ids.index(END, developer)
    enc = o200k_harmony()
    text = enc.decode(ids[body:end])
    text = f"{text}\n\n{response_format.text()}" if text else response_format.text()
    return ids[:body] + enc.encode(text, allowed_special=set(), disallowed_special=()) + ids[end:]


def tool_name(spec: dict) -> str:
    """The function name of an OpenAI-style tool spec (OssqError when it has none)."""
    spec = spec.get("function", spec) if spec.get("type") == "function" else spec
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise OssqError(f"a tool spec needs a string 'name': {spec!r}")
    return spec["name"]


def _tool_description(spec: dict) -> ToolDescription:
    name = tool_name(spec)
    spec = spec.get("function", spec) if spec.get("type") == "function" else spec
    return ToolDescription.new(name, spec.get("description") or "", spec.get("parameters"))


def _drop_finished_analysis(messages: list[Message]) -> list[Message]:
    finals = [i for i, m in enumerate(messages) if m.author.role == Role.ASSISTANT and m.channel == "final"]
    last_final = finals[-1] if finals else -1
    return [
        m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis" and m.recipient is None)
    ]


# ---- parsing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """New text of a completion as it streams. `message` numbers the completion's harmony messages from
    0, and `channel` (always one of CHANNELS) and `recipient` are that message's; the first Piece of a
    message is sent when its header is complete, with text "". `message` None: text outside any message,
    from a completion that is not harmony."""

    text: str
    channel: str | None = None
    recipient: str | None = None
    message: int | None = None


@dataclass(eq=False)
class _Message:
    channel: str
    recipient: str | None
    content_type: str | None
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def harmony(self) -> Message:
        message = _assistant(self.text, self.channel)
        if self.recipient is not None:
            message = message.with_recipient(self.recipient)
        return message if self.content_type is None else message.with_content_type(self.content_type)


_HEADER, _CONTENT, _BETWEEN, _RAW, _DONE = "header", "content", "between", "raw", "done"
_HEADER_ITEM = re.compile(r"<\|channel\|>|<\|constrain\|>|to=[^\s<]+|[^\s<]+|<")


class StreamParser:
    """Splits an assistant completion (the tokens after `<|start|>assistant`) into messages while it
    streams; feed it every generated token in order.

    Tolerant by design. A header is read word by word: the recipient (`to=NAME`) may sit in the role or
    the channel part, a bare `json` or `<|constrain|>json` is the content type, and anything else is
    noted in `error` and skipped. A missing or unknown channel becomes `commentary` for a message with a
    recipient and `final` otherwise. `<|start|>` or `<|channel|>` inside a message closes it; other
    special tokens never reach the text. A message another role begins (a made-up user turn) ends the
    completion, as `<|return|>` and `<|call|>` do; what follows is ignored. A header that runs past
    HEADER_MAX_TOKENS means the completion is not harmony: from there all its text is `raw`.
    """

    def __init__(self) -> None:
        self._enc = o200k_harmony()
        self._state = _HEADER
        self._header: list[int] = []
        self._role_first = False  # the completion starts after `<|start|>assistant`: no role in the first header
        self._messages: list[_Message] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw: list[str] = []
        self._errors: list[str] = []
        self._handlers = {
            _HEADER: self._in_header,
            _CONTENT: self._in_content,
            _BETWEEN: self._between,
            _RAW: self._in_raw,
            _DONE: self._after_end,
        }

    # -- streaming
    def push(self, token_id: int) -> list[Piece]:
        """Feed one token → the new text it completes (usually zero or one Piece)."""
        if token_id == ENDOFTEXT:
            return []
        return self._handlers[self._state](token_id)

    def feed(self, token_id: int) -> tuple[str | None, str]:
        """(channel, new text) of the message being streamed: channel None in headers and outside
        messages. The text is "" for header and special tokens, and for tokens ending mid UTF-8
        character (the character comes with the token that completes it)."""
        pieces = [p for p in self.push(token_id) if p.message is not None]
        if not pieces:
            return None, ""
        return pieces[-1].channel, "".join(p.text for p in pieces)

    def close(self) -> list[Piece]:
        """The completion ended: the text still held back (a partial character, or a short completion
        that never became harmony)."""
        if self._state == _CONTENT:
            tail = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return [self._piece(tail)] if tail else []
        if self._state in (_HEADER, _BETWEEN) and self._header and not self._messages:
            self._state = _RAW
            return self._to_raw()
        return []

    @property
    def recipient(self) -> str | None:
        """Recipient of the message being streamed (e.g. `functions.get_weather`), if any."""
        return self._messages[-1].recipient if self._state == _CONTENT else None

    def current(self) -> Piece | None:
        """Where the next text goes: the open message (as an empty Piece), `Piece("")` once the
        completion is known not to be harmony, None in a header or between messages."""
        if self._state == _CONTENT:
            m = self._messages[-1]
            return Piece("", m.channel, m.recipient, len(self._messages) - 1)
        return Piece("") if self._state == _RAW else None

    @property
    def error(self) -> str | None:
        return "; ".join(self._errors) or None

    def reply(self) -> Reply:
        """Everything fed so far as a Reply; a message still open is included with its partial text."""
        mine = self._messages
        raw = "".join(self._raw)
        if self._state in (_HEADER, _BETWEEN) and self._header and not mine:
            raw += self._header_text(text_only=True)
        errors = list(self._errors)
        if self._state in (_HEADER, _BETWEEN) and self._header and mine:
            errors.append(f"text outside a message: {self._header_text()!r}")
        return Reply(
            analysis="".join(m.text for m in mine if m.channel == "analysis" and m.recipient is None),
            final="".join(m.text for m in mine if m.channel == "final" and m.recipient is None),
            tool_calls=tuple(ToolCall(m.recipient.removeprefix(FUNCTIONS), m.text) for m in mine if m.recipient),
            messages=tuple(m.harmony() for m in mine),
            truncated=self._state in (_HEADER, _CONTENT, _RAW) or bool(self._header),
            error="; ".join(errors) or None,
            raw=raw,
        )

    # -- states
    def _in_header(self, t: int) -> list[Piece]:
        if t == MESSAGE:
            return self._open()
        if t == START:
            self._drop_header("a header was cut short by <|start|>")
            self._role_first = True
        elif t == END:
            self._drop_header("a header ended with <|end|>")
            self._state = _BETWEEN
        elif t in STOP_TOKENS:
            self._drop_header("the completion ended inside a header")
            self._state = _DONE
        else:
            self._header.append(t)
            if len(self._header) > HEADER_MAX_TOKENS:
                self._state = _RAW
                return self._to_raw()
        return []

    def _in_content(self, t: int) -> list[Piece]:
        if t in (END, *STOP_TOKENS, START, CHANNEL):
            pieces = self.close()
            if t in (START, CHANNEL):
                self._errors.append(f"message {len(self._messages) - 1} was not closed before a new header")
                self._state, self._role_first = _HEADER, t == START
                self._header = [CHANNEL] if t == CHANNEL else []
            else:
                self._state = _BETWEEN if t == END else _DONE
            return pieces
        if t >= N_RANKS:  # special tokens are never text
            return []
        text = self._utf8.decode(self._enc.decode_single_token_bytes(t))
        return [self._piece(text)] if text else []

    def _between(self, t: int) -> list[Piece]:
        if t == START:
            self._state, self._role_first = _HEADER, True
        elif t in STOP_TOKENS:
            self._state = _DONE
        elif t != END:
            self._errors.append("a message began without <|start|>")
            self._state, self._role_first = _HEADER, False
            return self._in_header(t)
        return []

    def _in_raw(self, t: int) -> list[Piece]:
        if t in STOP_TOKENS:
            self._state = _DONE
            return []
        if t >= N_RANKS:
            return []
        text = self._utf8.decode(self._enc.decode_single_token_bytes(t))
        self._raw.append(text)
        return [Piece(text)] if text else []

    def _after_end(self, t: int) -> list[Piece]:
        note = "tokens after the end of the completion were ignored"
        if not self._errors or self._errors[-1] != note:
            self._errors.append(note)
        return []

    # -- helpers
    def _open(self) -> list[Piece]:
        """The header is complete: start its message."""
        role, channel, recipient, content_type, junk = _parse_header(self._header_text(), self._role_first)
        self._header, self._role_first = [], False
        if junk:
            self._errors.append(f"unexpected text in a message header: {' '.join(junk)!r}")
        if role != "assistant":
            self._errors.append(f"the model began a message as {role!r}; the completion ends there")
            self._state = _DONE
            return []
        if recipient == "assistant":
            recipient = None
        if channel not in CHANNELS:
            self._errors.append(f"message {len(self._messages)} has channel {channel!r}")
            channel = "commentary" if recipient else "final"
        self._messages.append(_Message(channel, recipient, content_type))
        self._state = _CONTENT
        return [self._piece("")]

    def _piece(self, text: str) -> Piece:
        m = self._messages[-1]
        m.parts.append(text)
        return Piece(text, m.channel, m.recipient, len(self._messages) - 1)

    def _to_raw(self) -> list[Piece]:
        text = self._header_text(text_only=True)
        self._header = []
        self._raw.append(text)
        return [Piece(text)] if text else []

    def _drop_header(self, why: str) -> None:
        if self._header:
            self._errors.append(f"{why}: {self._header_text()!r}")
        self._header = []

    def _header_text(self, *, text_only: bool = False) -> str:
        """The header's tokens as text: `<|channel|>` and `<|constrain|>` spelled (unless `text_only`),
        other special tokens left out."""
        keep = () if text_only else (CHANNEL, CONSTRAIN)
        ids = [t for t in self._header if t < N_RANKS or t in keep]
        return b"".join(self._enc.decode_single_token_bytes(t) for t in ids).decode("utf-8", errors="replace")


def _parse_header(text: str, role_first: bool) -> tuple[str, str | None, str | None, str | None, list[str]]:
    """A header's (role, channel, recipient, content type, words that fit nowhere)."""
    role, channel, recipient, content_type, junk = "assistant", None, None, None, []
    expect = "role" if role_first else None
    for item in _HEADER_ITEM.findall(text):
        if item == "<|channel|>":
            expect = "channel"
        elif item == "<|constrain|>":
            expect = "constrain"
        elif item.startswith("to=") and len(item) > 3:
            if recipient is None:
                recipient = item[3:]
            else:
                junk.append(item)
        elif expect == "role":
            role, expect = item, None
        elif expect == "channel" and channel is None:
            channel, expect = item, None
        elif expect == "constrain" and content_type is None:
            content_type, expect = "<|constrain|>" + item, None
        elif channel is not None and content_type is None and item == "json":
            content_type = item
        else:
            junk.append(item)
    return role, channel, recipient, content_type, junk


def parse_reply(tokens: Sequence[int]) -> Reply:
    """Parse completion tokens (those after the prompt). Never raises, whatever the tokens."""
    parser = StreamParser()
    for token_id in tokens:
        parser.push(token_id)
    parser.close()
    return parser.reply()
