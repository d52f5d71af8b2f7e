"""The harmony chat format of gpt-oss, through openai-harmony: render prompts, stop, parse channels.

openai-harmony downloads its vocabulary unless `TIKTOKEN_ENCODINGS_BASE` names a directory holding
`o200k_base.tiktoken`; `encoding()` points it at ossq's verified local copy (spec offline.md §1).
Token ids and grammar: spec formats.md §6.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

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
    StreamableParser,
    StreamState,
    SystemContent,
    TextContent,
    ToolDescription,
    load_harmony_encoding,
)

from ossq.errors import OssqError, TokenizerError
from ossq.tokenizer import o200k_ranks_dir

RETURN = 200002  # ends the final answer
CALL = 200012  # ends a tool call
END = 200007  # ends a message inside a completion: never a stop
ENDOFTEXT = 199999  # HF's generation_config also stops on it; the parser ignores it
STOP_TOKENS = (RETURN, CALL)
REASONING_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}
FUNCTIONS = "functions."  # recipient prefix of function tools


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

    `analysis` and `final` concatenate the text of every message on that channel. `messages` are the
    assistant's harmony messages (the last one partial when `truncated`), fed back by `Chat.add_assistant`.
    `truncated`: the tokens ended inside a message (e.g. max_tokens). `error`: why parsing stopped early
    when the model broke the grammar (what came before is kept).
    """

    analysis: str
    final: str
    tool_calls: tuple[ToolCall, ...] = ()
    messages: tuple[Message, ...] = ()
    truncated: bool = False
    error: str | None = None


class Chat:
    """A multi-turn harmony conversation, rendered for the assistant's next completion.

    `system` replaces harmony's default model identity line; `developer` becomes `# Instructions`;
    `tools` are OpenAI-style function specs (`{"name", "description", "parameters"}`, optionally wrapped
    as `{"type": "function", "function": {...}}`).
    """

    def __init__(
        self,
        system: str | None = None,
        developer: str | None = None,
        *,
        reasoning_effort: str = "medium",
        tools: Sequence[dict] | None = None,
    ) -> None:
        if reasoning_effort not in REASONING_EFFORTS:
            raise OssqError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
        content = SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[reasoning_effort])
        if system is not None:
            content = content.with_model_identity(system)
        self._messages = [Message.from_role_and_content(Role.SYSTEM, content)]
        if developer is not None or tools:
            self._messages.append(Message.from_role_and_content(Role.DEVELOPER, _developer(developer, tools)))

    @property
    def messages(self) -> tuple[Message, ...]:
        """Every message so far (system first), analysis included."""
        return tuple(self._messages)

    def add_user(self, text: str) -> None:
        self._messages.append(Message.from_role_and_content(Role.USER, text))

    def add_assistant(self, reply: Reply) -> None:
        """Append a completion: its parsed messages, or ones built from its fields if it has none."""
        self._messages.extend(reply.messages or _messages_from_fields(reply))

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
        return encoding().render_conversation_for_completion(conversation, Role.ASSISTANT, no_auto_drop)


def render_prompt(user: str, **chat_kwargs) -> list[int]:
    """Prompt ids for a single user message; `chat_kwargs` as for `Chat`."""
    chat = Chat(**chat_kwargs)
    chat.add_user(user)
    return chat.prompt_tokens()


def _developer(instructions: str | None, tools: Sequence[dict] | None) -> DeveloperContent:
    content = DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([_tool_description(spec) for spec in tools])
    return content


def _tool_description(spec: dict) -> ToolDescription:
    spec = spec.get("function", spec) if spec.get("type") == "function" else spec
    if not isinstance(spec.get("name"), str):
        raise OssqError(f"a tool spec needs a string 'name': {spec!r}")
    return ToolDescription.new(spec["name"], spec.get("description", ""), spec.get("parameters"))


def _messages_from_fields(reply: Reply) -> list[Message]:
    def assistant(text: str, channel: str) -> Message:
        return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)

    messages = [assistant(reply.analysis, "analysis")] if reply.analysis else []
    for call in reply.tool_calls:
        message = assistant(call.arguments, "commentary").with_recipient(FUNCTIONS + call.name)
        messages.append(message.with_content_type("<|constrain|>json"))
    return messages + ([assistant(reply.final, "final")] if reply.final else [])


def _drop_finished_analysis(messages: list[Message]) -> list[Message]:
    finals = [i for i, m in enumerate(messages) if m.author.role == Role.ASSISTANT and m.channel == "final"]
    last_final = finals[-1] if finals else -1
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


class StreamParser:
    """Splits a completion into channels while it streams (feed it every generated token, in order)."""

    def __init__(self) -> None:
        self._parser = StreamableParser(encoding(), Role.ASSISTANT, strict=False)
        self._error: str | None = None

    def feed(self, token_id: int) -> tuple[str | None, str]:
        """(channel, new text): channel is `analysis`/`commentary`/`final`, or None in headers.

        The text is "" for header and special tokens, and for tokens ending mid UTF-8 character (the
        character comes with the token that completes it).
        """
        if self._error is not None or token_id == ENDOFTEXT:
            return None, ""
        try:
            self._parser.process(token_id)
        except HarmonyError as e:
            self._error = str(e)
            return None, ""
        return self._parser.current_channel, self._parser.last_content_delta or ""

    @property
    def recipient(self) -> str | None:
        """Recipient of the message being streamed (e.g. `functions.get_weather`), if any."""
        return self._parser.current_recipient

    def reply(self) -> Reply:
        """Everything fed so far as a Reply; a message still open is included with its partial text."""
        messages = list(self._parser.messages)
        state = self._parser.state
        if state == StreamState.CONTENT:
            messages.append(self._open_message())
        return _reply(messages, truncated=state != StreamState.EXPECT_START, error=self._error)

    def _open_message(self) -> Message:
        p = self._parser
        return Message(
            author=Author(role=p.current_role or Role.ASSISTANT),
            content=[TextContent(text=p.current_content)],
            channel=p.current_channel,
            recipient=p.current_recipient,
            content_type=p.current_content_type,
        )


def parse_reply(tokens: Sequence[int]) -> Reply:
    """Parse completion tokens (those after the prompt). Never raises on a truncated completion."""
    parser = StreamParser()
    for token_id in tokens:
        parser.feed(token_id)
    return parser.reply()


def _reply(messages: list[Message], *, truncated: bool, error: str | None) -> Reply:
    mine = [m for m in messages if m.author.role == Role.ASSISTANT]

    def text(m: Message) -> str:
        return "".join(c.text for c in m.content if isinstance(c, TextContent))

    calls = [
        ToolCall(m.recipient.removeprefix(FUNCTIONS), text(m)) for m in mine if m.recipient not in (None, "assistant")
    ]
    return Reply(
        analysis="".join(text(m) for m in mine if m.channel == "analysis"),
        final="".join(text(m) for m in mine if m.channel == "final"),
        tool_calls=tuple(calls),
        messages=tuple(mine),
        truncated=truncated,
        error=error,
    )
