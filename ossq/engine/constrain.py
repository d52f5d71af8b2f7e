"""Constrained decoding: `response_format` JSON enforced on the final channel of a harmony answer.

A `Constraint` says which token may come next and follows the tokens chosen. The engine
(engine/engine.py) ranks a constrained request's candidates in its sampler's own order — the exponential
race of engine/sampling.py, or the logits for a greedy request — and takes the first one the constraint
allows. The winner of the race among the allowed tokens is a draw from the request's distribution
restricted to them and renormalized, so the constraint changes nothing but what it must: a token it
allows is drawn exactly as often, relative to the others it allows, as without it.

`FinalJson` leaves the analysis and commentary channels and tool calls free and constrains the final
channel's message to one JSON value (an object for json_object, the schema's top-level `type` for
json_schema), then to the tokens that end the message. The schema's other rules are not enforced here;
they reach the model through the prompt (serve/prompts.py). The recognizer works on bytes: JSON's
structure is ASCII, and a multi-byte character can only sit inside a string, where any byte ≥ 0x20 but
`"` and `\\` stands for itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ossq.errors import InvalidArgument

CANDIDATES = 64  # tokens ranked per constrained row on the device before the host looks at the whole row

# The recognizer's state: (mode, open brackets, detail). Modes:
VALUE, ARRAY_FIRST, OBJECT_FIRST, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(12)
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
ROOT_OPENERS = {"object": b"{", "array": b"[", "string": b'"'}  # a top-level type fixed by its first byte
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")  # a schema's `type`s
# Numbers: sub-states and their transitions by byte class; the accepting ones may end at any other byte.
_NUMBER = {
    "sign": {"0": "zero", "1": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "1": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "1": "frac"},
    "frac": {"0": "frac", "1": "frac", "e": "e"},
    "e": {"+": "esign", "0": "exp", "1": "exp"},
    "esign": {"0": "exp", "1": "exp"},
    "exp": {"0": "exp", "1": "exp"},
}
_NUMBER_ENDS = frozenset({"zero", "int", "frac", "exp"})

State = tuple[int, str, object]


def _number_class(byte: int) -> str | None:
    if byte == ord("0"):
        return "0"
    if byte in DIGITS:
        return "1"
    return {ord("."): ".", ord("e"): "e", ord("E"): "e", ord("+"): "+", ord("-"): "+"}.get(byte)


def json_start(root: str | None = None) -> State:
    """The state before a JSON value; `root` fixes its top-level type ("object", "array", ...)."""
    return (VALUE, "", root)


def _closed(stack: str) -> State:
    """The state after a value completes inside `stack`."""
    return (AFTER, stack, None) if stack else (DONE, "", None)


def _value(stack: str, byte: int, root: object = None) -> State | None:
    """The state after the first byte of a value."""
    if byte in WHITESPACE:
        return (VALUE, stack, root)
    if root is not None and not stack:
        opener = ROOT_OPENERS.get(root)  # number, boolean, integer: checked by their first byte below
        if opener is not None and byte != opener[0]:
            return None
        if root in ("number", "integer") and not (byte in DIGITS or byte == ord("-")):
            return None
        if root == "boolean" and byte not in (ord("t"), ord("f")):
            return None
        if root == "null" and byte != ord("n"):
            return None
    if byte == ord("{"):
        return (OBJECT_FIRST, stack + "{", None)
    if byte == ord("["):
        return (ARRAY_FIRST, stack + "[", None)
    if byte == ord('"'):
        return (STRING, stack, False)
    if byte == ord("-"):
        return (NUMBER, stack, "sign")
    if byte in DIGITS:
        return (NUMBER, stack, "zero" if byte == ord("0") else "int")
    if byte in LITERALS:
        return (LITERAL, stack, LITERALS[byte])
    return None


def _after(stack: str, byte: int) -> State | None:
    if byte in WHITESPACE:
        return (AFTER, stack, None)
    top = stack[-1]
    if byte == ord(","):
        return (KEY, stack, None) if top == "{" else (VALUE, stack, None)
    if (byte == ord("}") and top == "{") or (byte == ord("]") and top == "["):
        return _closed(stack[:-1])
    return None


def json_step(state: State, byte: int) -> State | None:
    """The state after one more byte, or None when no JSON value continues so."""
    mode, stack, detail = state
    if mode == VALUE:
        return _value(stack, byte, detail)
    if mode == ARRAY_FIRST:
        if byte in WHITESPACE:
            return state
        return _closed(stack[:-1]) if byte == ord("]") else _value(stack, byte)
    if mode in (OBJECT_FIRST, KEY):
        if byte in WHITESPACE:
            return state
        if byte == ord("}") and mode == OBJECT_FIRST:
            return _closed(stack[:-1])
        return (STRING, stack, True) if byte == ord('"') else None
    if mode == COLON:
        return state if byte in WHITESPACE else (VALUE, stack, None) if byte == ord(":") else None
    if mode == AFTER:
        return _after(stack, byte)
    if mode == STRING:
        if byte == ord('"'):
            return (COLON, stack, None) if detail else _closed(stack)
        if byte == ord("\\"):
            return (ESCAPE, stack, detail)
        return None if byte < 0x20 else state
    if mode == ESCAPE:
        if byte == ord("u"):
            return (UNICODE, stack, (detail, 4))
        return (STRING, stack, detail) if byte in ESCAPES else None
    if mode == UNICODE:
        is_key, left = detail
        if byte not in HEX:
            return None
        return (STRING, stack, is_key) if left == 1 else (UNICODE, stack, (is_key, left - 1))
    if mode == NUMBER:
        nxt = _NUMBER[detail].get(_number_class(byte) or "")
        if nxt is not None:
            return (NUMBER, stack, nxt)
        if detail not in _NUMBER_ENDS or not stack:
            return None  # a top-level number ends only with the message: no byte may follow it but digits
        return _after(stack, byte)
    if mode == LITERAL:
        return None if byte != detail[0] else (LITERAL, stack, detail[1:]) if len(detail) > 1 else _closed(stack)
    return None  # DONE: nothing follows the value


def json_feed(state: State, data: bytes) -> State | None:
    for byte in data:
        state = json_step(state, byte)
        if state is None:
            return None
    return state


def json_complete(state: State) -> bool:
    """Whether the bytes so far are one whole JSON value (a top-level number may still grow)."""
    mode, stack, detail = state
    return mode == DONE or (mode == NUMBER and not stack and detail in _NUMBER_ENDS)


class Constraint(Protocol):
    def allows(self, token: int) -> bool:
        """Whether `token` may come next."""

    def only(self) -> frozenset[int] | None:
        """The few tokens that alone may come next, when the constraint knows them (else None)."""

    def advance(self, token: int) -> None:
        """`token` was chosen: follow it."""


class FinalJson:
    """The final channel's message as one JSON value, then its end (module docstring). `token_bytes(id)`
    is a token's bytes, None for a special token; `channel`, `message` are the ids of harmony's
    `<|channel|>` and `<|message|>`, `ends` those that may end the message."""

    def __init__(
        self,
        token_bytes: Callable[[int], bytes | None],
        *,
        channel: int,
        message: int,
        ends: Iterable[int],
        root: str | None = "object",
    ) -> None:
        if root is not None and root not in JSON_TYPES:
            raise InvalidArgument("response_format", f"a schema's top-level type must be a JSON type, got {root!r}")
        self.token_bytes, self.channel, self.message, self.ends = token_bytes, channel, message, frozenset(ends)
        self.root = root
        self.header: bytearray | None = None  # the header being read, after <|channel|>
        self.state: State | None = None  # inside the final message: the JSON so far

    @classmethod
    def for_schema(cls, tokenizer, schema: dict) -> FinalJson:
        """The constraint for a response format's JSON schema, with `tokenizer`'s harmony ids (its
        `token_bytes` and `token_id`); a top-level type that is not one string leaves the type free."""
        root = schema.get("type")
        ids = [tokenizer.token_id(name) for name in ("<|channel|>", "<|message|>", "<|return|>", "<|end|>")]
        return cls(tokenizer.token_bytes, channel=ids[0], message=ids[1], ends=ids[2:],
                   root=root if isinstance(root, str) else None)  # fmt: skip

    def allows(self, token: int) -> bool:
        if self.state is None:
            return True
        data = self.token_bytes(token)
        if data is None:
            return token in self.ends and json_complete(self.state)
        return json_feed(self.state, data) is not None

    def only(self) -> frozenset[int] | None:
        return self.ends if self.state is not None and self.state[0] == DONE else None

    def advance(self, token: int) -> None:
        if self.state is not None:
            data = self.token_bytes(token)
            self.state = None if data is None else json_feed(self.state, data)  # an end token: free again
        elif token == self.channel:
            self.header = bytearray()
        elif token == self.message and self.header is not None:
            words = bytes(self.header).split()
            if words[:1] == [b"final"] and not any(w.startswith(b"to=") for w in words):  # not a tool call
                self.state = json_start(self.root)
            self.header = None
        elif self.header is not None:
            self.header += self.token_bytes(token) or b" "  # <|constrain|> and the like separate words


def constrained_choice(keys: Tensor, logits: Tensor, rows: Sequence[tuple[int, Constraint, bool]]) -> dict[int, int]:
    """For each (row, constraint, sampled) the best-ranked token by `keys` (engine/sampling.py
    `ranking_keys`) that the constraint allows → {row: token}. A sampled row takes only tokens its filters
    keep (key > 0); when none of its allowed tokens survives them, the allowed token of the highest logit.
    The first CANDIDATES of each row are read at once; a row none of them fits is ranked whole."""
    index = torch.tensor([r for r, _, _ in rows], device=keys.device)
    keys, logits = keys[index], logits[index].float()
    top = keys.topk(min(CANDIDATES, keys.shape[-1]), dim=-1)
    ids, vals = top.indices.tolist(), top.values.tolist()
    out = {}
    for i, (row, c, sampled) in enumerate(rows):
        only = c.only()
        if only is not None:  # a few tokens alone: the best of them
            allowed = sorted(only)
            out[row] = allowed[int(keys[i, allowed].argmax())]
            continue
        pick = _first_allowed(c, ids[i], vals[i], sampled)
        if pick is None:
            order = keys[i].argsort(descending=True)
            pick = _first_allowed(c, order.tolist(), keys[i, order].tolist(), sampled)
        if pick is None:
            pick = _first_allowed(c, logits[i].argsort(descending=True).tolist(), None, False)
        if pick is None:
            raise AssertionError("a constraint allowed no token of the vocabulary")
        out[row] = pick
    return out


def _first_allowed(c: Constraint, ids: list[int], vals: list[float] | None, sampled: bool) -> int | None:
    for j, t in enumerate(ids):
        if (not sampled or vals[j] > 0) and c.allows(t):
            return t
    return None
