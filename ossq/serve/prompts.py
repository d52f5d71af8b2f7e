"""OpenAI requests → harmony prompts, through `ossq.harmony.Chat`.

- `system` and `developer` messages (and the Responses API's `instructions`) become the developer
  message's `# Instructions`, in order; harmony's system message is ossq's (model identity, knowledge
  cutoff, `Reasoning: <effort>`, the channels), as OpenAI's own harmony guide has it.
- `tools` become harmony's `functions` namespace. `tool_choice`: "auto" (the default) and a named
  function or "required" render the namespace; "none" leaves it out. A named function is forced by
  starting the completion with its call header (`<|channel|>commentary to=functions.NAME
  <|constrain|>json<|message|>`), "required" by starting it with `<|channel|>commentary to=functions.`.
- An assistant turn in the history may carry reasoning (`reasoning_content`/`reasoning`, or reasoning
  items) and tool calls together: reasoning goes on the analysis channel, text beside tool calls is a
  preamble, the calls are commentary messages to `functions.NAME`, and a tool result is the
  `functions.NAME` tool's message (its name found from the call id). A call to a function the request
  does not declare, or a result whose call id matches no call, is refused with a message saying so.
- `response_format` / `text.format` (json_object, json_schema) closes the developer message with
  harmony's `# Response Formats` section; the reasoning is not constrained by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ossq.engine.constrain import JSON_TYPES
from ossq.errors import OssqError
from ossq.harmony import Chat, ResponseFormat
from ossq.serve.protocol import (
    ApiError,
    ChatRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedToolChoice,
    ReasoningItem,
    ResponsesRequest,
    ResponsesToolChoice,
    TextPart,
)
from ossq.tokenizer import o200k_harmony

TEXT_PARTS = ("text", "input_text", "output_text", "reasoning_text", "summary_text")
JSON_OBJECT = ResponseFormat("json_object", {"type": "object"}, "Respond with a JSON object.")


@dataclass(frozen=True)
class Prompt:
    """What the engine runs: `tokens` ends with `prefill`, the start of the completion that the server
    wrote (a forced tool call's header), which the output parser reads first."""

    tokens: list[int]
    prefill: list[int]
    functions: frozenset[str]  # the functions the model may call
    response_format: ResponseFormat | None = None  # what the final channel's message must be (enforced)


def chat_prompt(req: ChatRequest) -> Prompt:
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    names = _names(tools, "tools")
    instructions = [
        _text(m.content, f"messages.{i}.content")
        for i, m in enumerate(req.messages)
        if m.role in ("system", "developer")
    ]
    fmt = _chat_format(req)
    chat, prefill, functions = _chat(instructions, tools, req.tool_choice, req.reasoning_effort, fmt, names)
    calls: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if m.role == "user":
            chat.add_user(_text(m.content, f"{where}.content"))
        elif m.role == "assistant":
            _assistant(chat, m, where, names, calls)
        elif m.role == "tool":
            name = calls.get(m.tool_call_id or "") or (m.name if m.name in names else None)
            if name is None:
                raise ApiError(
                    400,
                    f"{where}.tool_call_id: {m.tool_call_id!r} matches no tool call of an earlier assistant message",
                    param=f"{where}.tool_call_id",
                )
            chat.add_tool_result(name, _text(m.content, f"{where}.content"))
    return _prompt(chat, prefill, functions, fmt)


def _assistant(chat: Chat, m, where: str, names: frozenset[str], calls: dict[str, str]) -> None:
    reasoning = m.reasoning_content or m.reasoning
    if reasoning:
        chat.add_reasoning(reasoning)
    content = _text(m.content, f"{where}.content")
    if not m.tool_calls:
        if content:
            chat.add_answer(content)
        return
    if content:
        chat.add_preamble(content)
    for j, call in enumerate(m.tool_calls):
        _check_declared(call.function.name, names, f"{where}.tool_calls.{j}.function.name")
        chat.add_tool_call(call.function.name, call.function.arguments)
        if call.id:
            calls[call.id] = call.function.name


def responses_prompt(req: ResponsesRequest, items: Sequence, *, first_new: int) -> Prompt:
    """`items`: the stored conversation of `previous_response_id`, then this request's input items
    (from index `first_new`), as protocol models."""
    tools = [t.model_dump(exclude_none=True, exclude={"type", "strict"}) for t in req.tools or []]
    names = _names(tools, "tools")

    def where(i: int) -> str:
        return f"input.{i - first_new}" if i >= first_new else "previous_response_id"

    instructions = [req.instructions] if req.instructions else []
    instructions += [
        _text(it.content, f"{where(i)}.content")
        for i, it in enumerate(items)
        if isinstance(it, MessageItem) and it.role in ("system", "developer")
    ]
    fmt = _text_format(req)
    effort = req.reasoning.effort if req.reasoning else None
    chat, prefill, functions = _chat(instructions, tools, req.tool_choice, effort, fmt, names)
    calls: dict[str, str] = {}
    for i, it in enumerate(items):
        if isinstance(it, MessageItem):
            _message_item(chat, it, f"{where(i)}.content")
        elif isinstance(it, FunctionCallItem):
            _check_declared(it.name, names, f"{where(i)}.name")
            chat.add_tool_call(it.name, it.arguments)
            calls[it.call_id] = it.name
        elif isinstance(it, FunctionCallOutputItem):
            if it.call_id not in calls:
                raise ApiError(
                    400,
                    f"{where(i)}.call_id: {it.call_id!r} matches no function_call item before it",
                    param=f"{where(i)}.call_id",
                )
            chat.add_tool_result(calls[it.call_id], _text(it.output, f"{where(i)}.output"))
        elif isinstance(it, ReasoningItem):
            text = _text(it.content, f"{where(i)}.content") if it.content else _text(it.summary, where(i))
            if text:
                chat.add_reasoning(text)
    return _prompt(chat, prefill, functions, fmt)


def _message_item(chat: Chat, it: MessageItem, where: str) -> None:
    text = _text(it.content, where)
    if it.role == "user":
        chat.add_user(text)
    elif it.role == "assistant" and text:
        chat.add_preamble(text) if it.phase == "commentary" else chat.add_answer(text)


# ---- pieces both APIs share -------------------------------------------------------------------------------
def _chat(
    instructions: list[str],
    tools: list[dict],
    choice,
    effort: str | None,
    fmt: ResponseFormat | None,
    names: frozenset[str],
) -> tuple[Chat, str, frozenset[str]]:
    """The conversation's head → (Chat, prefill text, callable functions)."""
    prefill, functions = "", names
    if choice == "none":
        tools, functions = [], frozenset()
    elif choice == "required":
        if not names:
            raise ApiError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice")
        prefill = "<|channel|>commentary to=functions."
    elif isinstance(choice, (NamedToolChoice, ResponsesToolChoice)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        _check_declared(name, names, "tool_choice")
        prefill = f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
    try:
        chat = Chat(
            developer="\n\n".join(instructions) if instructions else None,
            reasoning_effort=effort or "medium",
            tools=tools or None,
            response_format=fmt,
        )
    except OssqError as e:
        raise ApiError(400, str(e), param="tools") from None
    return chat, prefill, functions


def _prompt(chat: Chat, prefill: str, functions: frozenset[str], fmt: ResponseFormat | None) -> Prompt:
    head = o200k_harmony().encode(prefill, allowed_special="all") if prefill else []
    return Prompt(chat.prompt_tokens() + head, head, functions, fmt)


def _names(tools: list[dict], param: str) -> frozenset[str]:
    names = [t["name"] for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ApiError(400, f"{param}.{i}: the function {name!r} is declared twice", param=f"{param}.{i}")
    return frozenset(names)


def _check_declared(name: str, names: frozenset[str], param: str) -> None:
    if name not in names:
        declared = ", ".join(sorted(names)) or "none"
        raise ApiError(
            400,
            f"{param}: {name!r} is not a declared function (declared: {declared}); declare it in tools",
            param=param,
        )


def _text(content: str | list[TextPart] | None, param: str) -> str:
    """The text of a message's content: a string, or text parts joined (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            raise ApiError(400, f"{param}.{j}: only text content is supported, got a {part.type!r} part", param=param)
        texts.append(part.text)
    return "".join(texts)


def _chat_format(req: ChatRequest) -> ResponseFormat | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return JSON_OBJECT
    if rf.json_schema is None or not rf.json_schema.schema_:
        raise ApiError(
            400, "response_format.json_schema.schema: a json_schema format needs a schema", param="response_format"
        )
    return _schema_format(rf.json_schema.name, rf.json_schema.schema_, rf.json_schema.description, "response_format")


def _text_format(req: ResponsesRequest) -> ResponseFormat | None:
    f = req.text.format if req.text else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return JSON_OBJECT
    if not f.schema_:
        raise ApiError(400, "text.format.schema: a json_schema format needs a schema", param="text.format")
    return _schema_format(f.name, f.schema_, f.description, "text.format")


def _schema_format(name: str, schema: dict, description: str | None, param: str) -> ResponseFormat:
    """A json_schema format whose top-level type the server can enforce (engine/constrain.py)."""
    root = schema.get("type")
    if isinstance(root, str) and root not in JSON_TYPES:
        types = ", ".join(JSON_TYPES)
        raise ApiError(400, f"{param}: the schema's type must be one of {types}, got {root!r}", param=param)
    return ResponseFormat(name, schema, description)
