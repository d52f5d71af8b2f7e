"""OpenAI's wire format: request bodies (pydantic models), errors, and the response objects.

Requests are checked field by field; a body that is not JSON, a field of the wrong type or out of range,
or a parameter ossq cannot honour becomes an `ApiError`, answered as OpenAI answers:
`{"error": {"message", "type", "param", "code"}}` with a 4xx status. Unknown fields are ignored, as
clients send many (`user`, `metadata`, `store`, ...).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ossq.engine.sampling import SamplingParams
from ossq.errors import InvalidArgument, OssqError, PromptTooLong

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_ossq(cls, e: OssqError, *, param: str | None = None) -> ApiError:
        """An engine refusal: the request's own fault (400)."""
        if isinstance(e, PromptTooLong):
            return cls(400, str(e), param=param or "messages", code="context_length_exceeded")
        if isinstance(e, InvalidArgument):
            return cls(400, str(e), param=e.name)
        return cls(400, str(e), param=param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- shared pieces --------------------------------------------------------------------------------------
class FunctionSpec(_Body):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ChatResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The sampling fields every generating endpoint takes (OpenAI's defaults: temperature 1, top_p 1)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # ossq and vLLM extensions: -1 or 0 = off
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=max(self.top_k or 0, 0),
                min_p=self.min_p or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0,
                seed=self.seed,
            )
        except InvalidArgument as e:
            raise ApiError.from_ossq(e) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


# ---- POST /v1/chat/completions ----------------------------------------------------------------------------
class TextPart(_Body):
    type: str
    text: str | None = None


class FunctionCallIn(_Body):
    name: str
    arguments: str = ""


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ChatResponseFormat | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    parallel_tool_calls: bool | None = None


# ---- POST /v1/completions -----------------------------------------------------------------------------------
class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    stop: str | list[str] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: None = None


# ---- POST /v1/responses --------------------------------------------------------------------------------------
class ResponsesTool(_Body):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(_Body):
    type: Literal["function"]
    name: str


class Reasoning(_Body):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    phase: str | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""
    id: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None


ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")
]


class ResponsesRequest(_Sampling):
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ResponsesToolChoice | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    previous_response_id: str | None = None
    store: bool = True
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def parse(cls, body: Any) -> ResponsesRequest:
        if isinstance(body, dict) and isinstance(body.get("input"), list):
            # an item with a role and no type is a message ("easy input message")
            body = dict(body, input=[_typed(item) for item in body["input"]])
        return parse(cls, body)


def _typed(item: Any) -> Any:
    if isinstance(item, dict) and "type" not in item and "role" in item:
        return dict(item, type="message")
    return item


# ---- parsing ---------------------------------------------------------------------------------------------------
def read_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def parse(model: type[_Body], body: Any):
    """`body` (decoded JSON) as `model`, or an ApiError naming the first wrong field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        # in a union every member reports; the deepest error is from the member the body was closest to
        first = max(e.errors(), key=lambda err: len(err["loc"]))
        loc = ".".join(str(part) for i, part in enumerate(first["loc"]) if not _is_union_tag(first["loc"], i))
        message = first["msg"]
        if first["type"] == "missing":
            message = "a required field is missing"
        elif first["type"] == "extra_forbidden":
            message = "this field is not allowed"
        raise ApiError(400, f"{loc}: {message}" if loc else message, param=loc or None) from None


def _is_union_tag(loc: tuple, i: int) -> bool:
    """Whether `loc[i]` names the union member pydantic tried (`str`, `list[TextPart]`, a model class,
    an input item's `type`) rather than a field: error locations name the body's fields only."""
    part = loc[i]
    if not isinstance(part, str):
        return False
    member = "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool")
    return member or (i > 0 and isinstance(loc[i - 1], int) and part in ITEM_TYPES)


# ---- response objects -----------------------------------------------------------------------------------------
def now() -> int:
    return int(time.time())


def chat_usage(prompt: int, completion: int, *, cached: int, reasoning: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def responses_usage(prompt: int, completion: int, *, cached: int, reasoning: int) -> dict:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ossq"}
