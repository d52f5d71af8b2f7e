"""The Responses API's output: items and streaming events built from a completion's deltas, and the
bounded store behind `previous_response_id`.

Output items come in the order the model produced them: a `reasoning` item (its text as a
`reasoning_text` content part), a `message` item (an `output_text` part), one `function_call` item per
call. Streaming sends, per item, `response.output_item.added`, the part's `content_part.added`, the
deltas (`response.reasoning_text.delta`, `response.output_text.delta`,
`response.function_call_arguments.delta`), their `.done`, `response.output_item.done`; around them
`response.created`, `response.in_progress` and, at the end, `response.completed` (or
`response.incomplete` when max_output_tokens cut it). Every event has a `sequence_number`.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import TypeAdapter

from ossq.serve.completion import Delta
from ossq.serve.protocol import InputItem

MAX_STORED_RESPONSES = 1024  # responses kept for previous_response_id, least recently used dropped first
_ITEM = TypeAdapter(InputItem)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Stored:
    response: dict
    items: list  # the whole conversation as input items: what it was given, then its output


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response: dict, given: list) -> None:
        """Keep `response` and the conversation that led to it (`given`: input items)."""
        items = given + [_ITEM.validate_python(item) for item in response["output"]]
        self._responses[response["id"]] = Stored(response, items)
        self._responses.move_to_end(response["id"])
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def __len__(self) -> int:
        return len(self._responses)


class ResponseBuilder:
    """Turns deltas into output items and the events that announce them."""

    def __init__(self, response: dict) -> None:
        self.response = response  # the skeleton: id, model, the request's echoed fields
        self.output: list[dict] = response["output"]
        self._seq = 0
        self._open: dict | None = None

    def start(self) -> list[dict]:
        snapshot = dict(self.response, output=[])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def add(self, delta: Delta) -> list[dict]:
        if delta.kind == "call":
            return self._close("completed") + self._begin(
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "call_id": delta.call_id,
                    "name": delta.name,
                    "arguments": "",
                    "status": "in_progress",
                }
            )
        if delta.kind == "arguments":
            self._open["arguments"] += delta.text
            return [self._event("response.function_call_arguments.delta", **self._where(), delta=delta.text)]
        if not delta.text:
            return []
        kind = "reasoning" if delta.kind == "reasoning" else "message"
        events = []
        if self._open is None or self._open["type"] != kind:
            events = self._close("completed") + self._begin(
                _reasoning_item() if kind == "reasoning" else _message_item()
            )
        part = self._open["content"][0]
        part["text"] += delta.text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self._event(name, **self._where(), content_index=0, delta=delta.text, **extra)]

    def finish(self, finish_reason: str, usage: dict) -> list[dict]:
        incomplete = finish_reason == "length"
        events = self._close("incomplete" if incomplete else "completed")
        self.response.update(
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage=usage,
        )
        kind = "response.incomplete" if incomplete else "response.completed"
        return events + [self._event(kind, response=self.response)]

    def fail(self, message: str, code: str) -> list[dict]:
        self._close("incomplete")
        self.response.update(status="failed", error={"code": code, "message": message})
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.response),
        ]

    # ---- items
    def _begin(self, item: dict) -> list[dict]:
        self.output.append(item)
        self._open = item
        events = [self._event("response.output_item.added", output_index=len(self.output) - 1, item=_copy(item))]
        if item["type"] != "function_call":
            part = item["content"][0]
            events.append(self._event("response.content_part.added", **self._where(), content_index=0, part=dict(part)))
        return events

    def _close(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = self._where(item)
        item["status"] = status
        if item["type"] == "function_call":
            events = [
                self._event(
                    "response.function_call_arguments.done", **where, arguments=item["arguments"], name=item["name"]
                )
            ]
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                done = self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            else:
                done = self._event(
                    "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]
                )
            events = [done, self._event("response.content_part.done", **where, content_index=0, part=dict(part))]
        return events + [self._event("response.output_item.done", output_index=where["output_index"], item=_copy(item))]

    def _where(self, item: dict | None = None) -> dict:
        item = self._open if item is None else item
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _event(self, kind: str, **fields) -> dict:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}


def _reasoning_item() -> dict:
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": ""}],
        "status": "in_progress",
    }


def _message_item() -> dict:
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}],
    }


def _copy(item: dict) -> dict:
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(part) for part in out["content"]]
    return out
