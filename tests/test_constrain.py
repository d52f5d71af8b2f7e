"""Constrained decoding (engine/constrain.py): the JSON recognizer agrees with Python's json parser on
valid documents, every prefix of them and random corruptions; FinalJson constrains the final channel only;
in the engine a constrained request's tokens are the sampler's own choice wherever the constraint allows
it (an allow-everything constraint changes no token, greedy or sampled), and otherwise always spell a JSON
prefix that ends only when complete."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ossq.engine.constrain import FinalJson, json_complete, json_feed, json_start
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.sampling import SamplingParams
from ossq.errors import InvalidArgument
from tests.conftest import random_model


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-(10**6), 10**6)
    if kind == "float":
        return rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-8, 8)
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\té€😀\x01') for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{rng.randint(0, 9)}": random_value(rng, depth + 1) for _ in range(3)}


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = {f"k{i}": random_value(rng) for i in range(rng.randint(0, 3))}
        indent = rng.choice([None, 0, 2])
        out.append(json.dumps(value, indent=indent, ensure_ascii=rng.random() < 0.5))
    return out


def parses_as_object(text: str) -> bool:
    def no_constant(name: str):
        raise ValueError(name)

    try:
        return isinstance(json.loads(text, parse_constant=no_constant), dict)
    except ValueError:
        return False


def test_every_prefix_of_a_valid_document_is_accepted_and_the_whole_is_complete():
    for doc in documents(300):
        data = doc.encode()
        state = json_start("object")
        for i, byte in enumerate(data):
            state = json_feed(state, bytes([byte]))
            assert state is not None, (doc, i)
            assert not json_complete(state) or i == len(data) - 1, (doc, i)
        assert json_complete(state), doc


def test_the_recognizer_agrees_with_json_loads_on_corrupted_documents():
    rng = random.Random(1)
    alphabet = b'{}[]:," \\ue0-1.5Etrufalsn\n\x01'
    checked = 0
    for doc in documents(600, seed=2):
        data = bytearray(doc.encode())
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(data) + 1)
            op = rng.choice(["insert", "delete", "replace"])
            if op == "insert":
                data[at:at] = bytes([rng.choice(alphabet)])
            elif at < len(data):
                data[at : at + 1] = b"" if op == "delete" else bytes([rng.choice(alphabet)])
        text = bytes(data)
        try:
            decoded = text.decode()
        except UnicodeDecodeError:
            continue
        if decoded != decoded.rstrip(" \t\n\r"):
            continue  # json.loads takes trailing whitespace; the constraint ends the message at the value
        state = json_feed(json_start("object"), text)
        assert (state is not None and json_complete(state)) == parses_as_object(decoded), decoded
        checked += 1
    assert checked > 400


@pytest.mark.parametrize(
    "root, good, bad",
    [("array", "[1, {}]", '{"a": 1}'), ("string", '"x"', "1"), ("number", "-1.5e3", '"1"'), ("boolean", "false", "0"),
     (None, "null", "nul")],
)  # fmt: skip
def test_a_schema_type_fixes_the_top_level_value(root, good, bad):
    assert json_complete(json_feed(json_start(root), good.encode()))
    state = json_feed(json_start(root), bad.encode())
    assert state is None or not json_complete(state)


# ---- FinalJson over a small vocabulary ------------------------------------------------------------------
PIECES = ['{"', "a", '":', " 1", "}", "[", "]", " ", "final", "analysis", "commentary to=functions.f", "x", "}}"]
CHANNEL, MESSAGE, RETURN, END, CONSTRAIN = 100, 101, 102, 103, 104  # specials: no bytes
VOCAB = 128


def piece(token: int) -> bytes | None:
    return PIECES[token % len(PIECES)].encode() if token < CHANNEL else None


def final_json(**kw) -> FinalJson:
    return FinalJson(piece, channel=CHANNEL, message=MESSAGE, ends=(RETURN, END), **kw)


def tok(text: str) -> int:
    return PIECES.index(text)


def test_final_json_constrains_the_final_channel_only():
    c = final_json()
    for t in (CHANNEL, tok("analysis"), MESSAGE):
        c.advance(t)
    assert c.allows(tok("x")) and c.allows(END)  # the analysis channel is free
    for t in (tok("x"), END, CHANNEL, tok("final"), MESSAGE):
        c.advance(t)
    assert not c.allows(tok("x")) and not c.allows(RETURN) and not c.allows(tok("}"))
    assert c.allows(tok('{"')) and c.allows(tok(" ")) and c.only() is None
    for t in (tok('{"'), tok("a"), tok('":'), tok(" 1")):
        assert c.allows(t)
        c.advance(t)
    assert not c.allows(RETURN) and not c.allows(tok("}}"))  # incomplete; one brace too many
    c.advance(tok("}"))
    assert c.only() == frozenset({RETURN, END}) and c.allows(RETURN) and not c.allows(tok(" "))


def test_final_json_leaves_a_tool_call_on_the_final_channel_free():
    c = final_json()
    for t in (CHANNEL, tok("final"), tok(" "), tok("commentary to=functions.f"), CONSTRAIN, MESSAGE):
        c.advance(t)
    assert c.allows(tok("x"))


def test_a_root_that_is_no_json_type_is_refused():
    with pytest.raises(InvalidArgument, match="top-level type"):
        final_json(root="thing")


# ---- in the engine ----------------------------------------------------------------------------------------
class AllowAll:
    def allows(self, token: int) -> bool:
        return True

    def only(self):
        return None

    def advance(self, token: int) -> None:
        pass


@pytest.fixture(scope="module")
def model():
    return random_model()


def run(model, params, constraint=None, max_tokens=24) -> list[int]:
    engine = Engine(model, EngineConfig(kv_cache_tokens=512))
    rid = engine.add_request([1, 2, 3, 4, 5], params, max_tokens=max_tokens, stop={RETURN}, constraint=constraint)
    while engine.has_unfinished:
        engine.step()
    return engine.request(rid).output


SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=5)


@pytest.mark.parametrize("params", [None, SAMPLED, SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=2)])
def test_a_constraint_that_allows_everything_changes_no_token(model, params):
    assert run(model, params, AllowAll()) == run(model, params)


@pytest.mark.parametrize("params", [None, SAMPLED])
def test_a_constrained_request_spells_json_and_ends_only_when_it_is_complete(model, params):
    assert model.config.vocab_size >= VOCAB
    c = final_json()
    for t in (CHANNEL, tok("final"), MESSAGE):
        c.advance(t)
    out = run(model, params, c, max_tokens=40)
    text = b"".join(piece(t) or b"" for t in out if t != RETURN)
    state = json_feed(json_start("object"), text)
    assert state is not None, text
    assert all(t < CHANNEL or t in (RETURN, END) for t in out)
    if out[-1] == RETURN:
        assert json_complete(state) and isinstance(json.loads(text), dict)


def test_the_constrained_choice_is_the_best_allowed_candidate(model):
    # Forbid whatever the unconstrained greedy run picks first: the constrained run takes the next best.
    free = run(model, None, max_tokens=1)[0]

    class Not:
        def allows(self, token: int) -> bool:
            return token != free

        def only(self):
            return None

        def advance(self, token: int) -> None:
            pass

    from ossq.engine.engine import forward_full

    logits = forward_full(model, torch.tensor([[1, 2, 3, 4, 5]]))[0, -1]
    second = logits.topk(2).indices[1].item()
    assert run(model, None, Not(), max_tokens=1) == [second]
