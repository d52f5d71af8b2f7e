"""Harmony end to end: `ossq serve` driven by a model whose logits force scripted completions.

`ScriptedModel` stands in for gpt-oss behind the real engine and server (this file, run as a script,
serves it). It reads the last user message of its prompt and emits tokens accordingly:
- `script:<completion>`: exactly that completion (harmony special tokens spelled out), then
  `<|endoftext|>`; several completions separated by `@@` are the turns of an agent loop (turn k is used
  once k `<|call|>`s follow the user message in the prompt);
- `echo`: a final answer that repeats the prompt, special tokens as newlines, so tests read what was
  rendered (reasoning effort, instructions, tools, history);
- `loop:<text>`: a final answer repeating `text` until max_tokens (requests that stay in flight);
- `crash`: the forward pass raises, as a bug or an out-of-memory would.
So each way a model can break harmony — a tool call on the analysis channel, a malformed header, a
truncated call, an unknown recipient — is sent through the whole server and checked in the response.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import functools
import json
import sys

import pytest
import torch

from ossq.harmony import CALL, CHANNEL, END, ENDOFTEXT, MESSAGE, RETURN, START
from ossq.tokenizer import N_RANKS, o200k_harmony

SCRIPT, LOOP, ECHO, CRASH, TURNS = "script:", "loop:", "echo", "crash", "@@"
FORCED = 30.0  # the scripted token's logit; every other token has −FORCED


class ScriptedModel(torch.nn.Module):
    """`model(batch, kv)` → logits (R, V) with the scripted next token of each wanted row far ahead.

    Keeps each sequence's tokens (keyed by its first KV block, so run it without the prefix cache and
    with a pool large enough that nothing is preempted); its prompt ends where its first logits are
    wanted."""

    def __init__(self, config) -> None:
        super().__init__()
        from ossq.engine.ops import select_ops
        from ossq.engine.parallel import SINGLE

        self.config, self.dtype, self.device = config, torch.float32, torch.device("cpu")
        self.ops, self.parallel = select_ops("torch"), SINGLE
        self.enc = o200k_harmony()
        self.tokens: dict[int, list[int]] = {}
        self.prompt_len: dict[int, int] = {}
        self.user, self.final, self.newline = (self.enc.encode(s)[0] for s in ("user", "final", "\n"))

    def forward(self, batch, kv) -> torch.Tensor:
        tokens, starts, ends = batch.tokens.tolist(), batch.host_query_start, batch.host_seq_lens
        keys = batch.block_tables[:, 0].tolist()
        for s, key in enumerate(keys):
            chunk = tokens[starts[s] : starts[s + 1]]
            first = ends[s] - len(chunk)
            if first == 0:
                self.tokens[key], _ = [], self.prompt_len.pop(key, None)
            self.tokens[key][first:] = chunk
        rows = batch.logits_rows.tolist()
        logits = torch.full((len(rows), self.config.vocab_size), -FORCED)
        for i, row in enumerate(rows):
            s = bisect.bisect_right(starts, row) - 1
            position = ends[s] - (starts[s + 1] - row)
            key = keys[s]
            self.prompt_len.setdefault(key, position + 1)
            logits[i, self._next(self.tokens[key][: position + 1], self.prompt_len[key])] = FORCED
        return logits

    def _next(self, context: list[int], prompt_len: int) -> int:
        prompt, done = context[:prompt_len], len(context) - prompt_len
        user, turn = self._last_user(prompt)
        head = [CHANNEL, self.final, MESSAGE]
        if user.startswith(LOOP):
            body = self._encode(user[len(LOOP) :])
            return head[done] if done < len(head) else body[(done - len(head)) % len(body)]
        if user.startswith(SCRIPT):
            turns = user[len(SCRIPT) :].split(TURNS)
            script = self._encode(turns[min(turn, len(turns) - 1)])
        elif user.startswith(CRASH):
            raise RuntimeError("a scripted failure of the forward pass")
        elif user.startswith(ECHO):
            script = (*head, *[t if t < N_RANKS else self.newline for t in prompt], RETURN)
        else:
            script = ()
        return script[done] if done < len(script) else ENDOFTEXT

    @functools.lru_cache(maxsize=256)  # noqa: B019  (the model lives as long as its server)
    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.enc.encode(text, allowed_special="all"))

    def _last_user(self, prompt: list[int]) -> tuple[str, int]:
        """The text of the prompt's last user message, and how many tool calls came after it."""
        starts = [i for i in range(len(prompt) - 2) if prompt[i] == START and prompt[i + 1] == self.user]
        if not starts:
            return "", 0
        begin = starts[-1] + 3
        end = prompt.index(END, begin)
        return self.enc.decode(prompt[begin:end]), prompt[end:].count(CALL)


def serve_scripted(argv: list[str]) -> None:
    from ossq.config import PRESETS
    from ossq.engine.engine import Engine, EngineConfig
    from ossq.serve.app import ServeConfig, listen, serve
    from ossq.tokenizer import Tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=8)
    args = p.parse_args(argv)
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=16384)
    engine_config = EngineConfig(kv_cache_tokens=131072, max_num_seqs=args.max_num_seqs, prefix_cache=False)
    engine = Engine(ScriptedModel(config), engine_config)
    serve(engine, Tokenizer.o200k_harmony(), ServeConfig("scripted", max_queue=args.max_queue), listen("127.0.0.1", 0))


if __name__ == "__main__":
    serve_scripted(sys.argv[1:])
    sys.exit(0)


# ---- the tests -----------------------------------------------------------------------------------------------
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve import ServerProcess  # noqa: E402  (after the skips: it needs openai and httpx)

MODEL = "scripted"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANALYSIS = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
CALL_ON_ANALYSIS = '<|channel|>analysis to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
CALL_ON_COMMENTARY = (
    ANALYSIS + '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
)


@pytest.fixture(scope="module")
def server():
    s = ServerProcess([sys.executable, __file__, "--max-num-seqs", "2", "--max-queue", "2"])
    yield s
    s.stop()


def ask(server, script: str, **kwargs):
    kwargs.setdefault("max_tokens", 256)
    messages = kwargs.pop("messages", [{"role": "user", "content": script}])
    return server.client().chat.completions.create(model=MODEL, messages=messages, **kwargs)


def ask_streaming(server, script: str, **kwargs) -> dict:
    """A streamed chat completion, accumulated as a client would: content, reasoning, tool calls."""
    kwargs.setdefault("max_tokens", 256)
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": script}], stream=True, **kwargs
    )
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for chunk in stream:
        delta = chunk.choices[0].delta
        out["content"] += delta.content or ""
        out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = out["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] = (call.function.name if call.function else None) or entry["name"]
            entry["arguments"] += (call.function.arguments if call.function else None) or ""
        out["finish"] = chunk.choices[0].finish_reason or out["finish"]
    return out


def reasoning(message) -> str | None:
    return getattr(message, "reasoning_content", None)


# ---- channels -----------------------------------------------------------------------------------------------
def test_analysis_is_reasoning_content_and_final_is_content_never_mixed(server):
    script = SCRIPT + ANALYSIS + "<|channel|>final<|message|>It is sunny.<|return|>"
    out = ask(server, script)
    message = out.choices[0].message
    assert (message.content, reasoning(message)) == ("It is sunny.", "Need the weather.")
    assert out.choices[0].finish_reason == "stop"
    assert 0 < out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens
    streamed = ask_streaming(server, script)
    assert (streamed["content"], streamed["reasoning"], streamed["finish"]) == (
        "It is sunny.",
        "Need the weather.",
        "stop",
    )


@pytest.mark.parametrize("completion", [CALL_ON_COMMENTARY, CALL_ON_ANALYSIS], ids=["commentary", "analysis"])
def test_a_tool_call_is_recognised_by_its_recipient_on_any_channel(server, completion):
    out = ask(server, SCRIPT + completion, tools=[WEATHER])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert choice.message.tool_calls[0].id.startswith("call_")
    assert not choice.message.content and "Paris" not in (reasoning(choice.message) or "")
    streamed = ask_streaming(server, SCRIPT + completion, tools=[WEATHER])
    assert streamed["finish"] == "tool_calls" and streamed["content"] == ""
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == [("get_weather", '{"city":"Paris"}')]


@pytest.mark.parametrize(
    ("completion", "content"),
    [
        ("<|channel|>final garbage words <|constrain|> json extra<|message|>Hello.<|return|>", "Hello."),
        ("<|start|>assistant<|channel|>final<|message|>Recipient-less start.<|return|>", "Recipient-less start."),
        ("<|channel|>final<|channel|>final<|message|>Twice.<|return|>", "Twice."),
        ("<|message|>No header at all.<|return|>", "No header at all."),
        ("<|channel|>final<|message|>Never closed", "Never closed"),
        ("<|channel|>final<|message|>Hi.<|end|><|start|>user<|message|>a made-up user turn<|end|>", "Hi."),
        ("<|channel|>final<|message|>One<|start|>assistant<|channel|>final<|message|> two.<|return|>", "One two."),
        ("plain text that is not harmony", "plain text that is not harmony"),
        ("<|channel|>final<|message|>A <|constrain|>stray special.<|return|>", "A stray special."),
    ],
    ids=[
        "junk-header",
        "start-first",
        "channel-twice",
        "no-header",
        "unterminated",
        "fake-user",
        "unclosed",
        "raw",
        "special",
    ],
)
def test_a_completion_that_breaks_harmony_degrades_to_a_well_formed_answer(server, completion, content):
    out = ask(server, SCRIPT + completion)
    assert out.choices[0].message.content == content
    assert out.choices[0].finish_reason == "stop"
    assert ask_streaming(server, SCRIPT + completion)["content"] == content


def test_a_call_cut_by_max_tokens_is_reported_with_finish_reason_length(server):
    completion = (
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "San Francisco"}<|call|>'
    )
    header = len(o200k_harmony().encode(completion.split("<|message|>")[0], allowed_special="all")) + 1
    out = ask(server, SCRIPT + completion, tools=[WEATHER], max_tokens=header + 3)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and '{"city": "San Francisco"}'.startswith(call.function.arguments)
    assert 0 < len(call.function.arguments) < len('{"city": "San Francisco"}')


@pytest.mark.parametrize(
    "completion",
    [
        '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"weather"}<|call|>',
        '<|channel|>commentary to=functions.delete_everything <|constrain|>json<|message|>{"all":true}<|call|>',
    ],
    ids=["builtin-tool", "undeclared-function"],
)
def test_a_message_to_an_undeclared_recipient_is_reasoning_not_a_tool_call(server, completion):
    out = ask(server, SCRIPT + completion, tools=[WEATHER])
    choice = out.choices[0]
    assert not choice.message.tool_calls and not choice.message.content
    assert '":' in reasoning(choice.message)  # the arguments went to the reasoning
    assert choice.finish_reason == "stop"


def test_special_tokens_never_reach_content_or_reasoning(server):
    script = SCRIPT + ANALYSIS + "<|channel|>final<|message|>Done.<|return|>"
    for out in (ask(server, script, tools=[WEATHER]), ask(server, SCRIPT + CALL_ON_ANALYSIS, tools=[WEATHER])):
        message = out.choices[0].message
        for text in (
            message.content or "",
            reasoning(message) or "",
            *(c.function.arguments for c in message.tool_calls or []),
        ):
            assert "<|" not in text and "to=" not in text


# ---- what is rendered --------------------------------------------------------------------------------------
@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_is_rendered_into_the_system_message(server, effort):
    out = ask(server, ECHO, reasoning_effort=effort)
    assert f"Reasoning: {effort}" in out.choices[0].message.content
    assert "Reasoning: medium" in ask(server, ECHO).choices[0].message.content


def test_system_and_developer_messages_become_the_instructions_and_tools_the_namespace(server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": ECHO},
    ]
    text = ask(server, "", messages=messages, tools=[WEATHER]).choices[0].message.content
    assert "# Instructions\n\nBe brief.\n\nAnswer in French." in text
    assert "namespace functions {" in text and "type get_weather = (_: {" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert (
        "namespace functions" not in ask(server, ECHO, tools=[WEATHER], tool_choice="none").choices[0].message.content
    )


def test_response_format_closes_the_developer_message():
    # The rendering, read off the prompt: the server would hold an echo of it to JSON (next tests).
    from ossq.serve.prompts import chat_prompt
    from ossq.serve.protocol import ChatRequest

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "description": "The reply.", "schema": schema}}
    prompt = chat_prompt(ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=fmt))
    text = o200k_harmony().decode(prompt.tokens)
    assert f"# Response Formats\n\n## reply\n\n// The reply.\n{json.dumps(schema)}<|end|>" in text
    assert prompt.response_format is not None and prompt.response_format.schema == schema


JSON_OBJECT = {"type": "json_object"}


def test_response_format_lets_a_json_answer_through_and_leaves_the_analysis_free(server):
    script = f"{SCRIPT}<|channel|>analysis<|message|>not json at all<|end|><|start|>assistant<|channel|>final"
    reply = ask(server, script + '<|message|>{"x": [1, 2.5, "é"]}<|return|>', response_format=JSON_OBJECT)
    message = reply.choices[0].message
    assert message.content == '{"x": [1, 2.5, "é"]}' and reply.choices[0].finish_reason == "stop"
    assert message.reasoning_content == "not json at all"


@pytest.mark.parametrize("answer", ["Sure! Here it is: {}", '{"a": 1,} trailing', "[1, 2]"])
def test_response_format_holds_a_final_answer_that_is_not_json_to_json(server, answer):
    from ossq.engine.constrain import json_complete, json_feed, json_start

    for fmt in (JSON_OBJECT, {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}):
        script = f"{SCRIPT}<|channel|>final<|message|>{answer}<|return|>"
        reply = ask(server, script, response_format=fmt, max_tokens=40)
        content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        state = json_feed(json_start("object"), content.encode())
        assert state is not None, content  # every answer is a JSON object so far
        if finish != "length":
            assert finish == "stop" and json_complete(state) and isinstance(json.loads(content), dict)


def test_response_format_leaves_a_tool_call_free(server):
    header = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    call = f'{SCRIPT}{header}{{"city":"Oslo"}}<|call|>'
    reply = ask(server, call, tools=[WEATHER], response_format=JSON_OBJECT)
    assert reply.choices[0].message.tool_calls[0].function.arguments == '{"city":"Oslo"}'


def test_a_schema_of_no_json_type_is_a_400(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "thing"}}}
    with pytest.raises(openai.BadRequestError, match="the schema's type must be one of object"):
        ask(server, ECHO, response_format=fmt)


def test_an_assistant_turn_with_reasoning_and_tool_calls_goes_back_into_the_prompt(server):
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should look it up.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"celsius": -3}'},
        {"role": "user", "content": ECHO},
    ]
    text = ask(server, "", messages=messages, tools=[WEATHER]).choices[0].message.content
    assert "I should look it up." in text  # the analysis of the turn that called a tool is kept
    assert 'assistant to=functions.get_weather\ncommentary \njson\n{"city":"Oslo"}' in text
    assert 'functions.get_weather to=assistant\ncommentary\n{"celsius": -3}' in text


@pytest.mark.parametrize(
    ("choice", "script", "arguments"),
    [
        ({"type": "function", "function": {"name": "get_weather"}}, '{"city":"Rome"}<|call|>', '{"city":"Rome"}'),
        ("required", 'get_weather <|constrain|>json<|message|>{"city":"Lima"}<|call|>', '{"city":"Lima"}'),
    ],
    ids=["named", "required"],
)
def test_tool_choice_forces_the_call(server, choice, script, arguments):
    out = ask(server, SCRIPT + script, tools=[WEATHER], tool_choice=choice)
    assert [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls] == [
        ("get_weather", arguments)
    ]
    assert out.choices[0].finish_reason == "tool_calls"
    streamed = ask_streaming(server, SCRIPT + script, tools=[WEATHER], tool_choice=choice)
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == [("get_weather", arguments)]


# ---- sampling-side options ------------------------------------------------------------------------------------
def test_stop_strings_cut_the_content_only(server):
    script = SCRIPT + "<|channel|>analysis<|message|>I will say STOP.<|end|><|start|>assistant"
    script += "<|channel|>final<|message|>Hello, world. STOP here.<|return|>"
    out = ask(server, script, stop=["STOP"])
    assert out.choices[0].message.content == "Hello, world. "
    assert reasoning(out.choices[0].message) == "I will say STOP."
    assert out.choices[0].finish_reason == "stop"
    assert ask_streaming(server, script, stop=["STOP"])["content"] == "Hello, world. "


def test_logprobs_cover_the_content_tokens(server):
    script = SCRIPT + ANALYSIS + "<|channel|>final<|message|>Forty-two.<|return|>"
    out = ask(server, script, logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == "Forty-two."
    for e in entries:
        assert e.logprob == pytest.approx(0.0, abs=1e-6)  # the scripted token is certain
        assert e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 2


# ---- the Responses API -------------------------------------------------------------------------------------
RESPONSES_TOOL = {"type": "function", **WEATHER["function"]}
AGENT = SCRIPT + CALL_ON_COMMENTARY + TURNS + "<|channel|>final<|message|>It is 20 degrees in Paris.<|return|>"


def test_responses_two_turn_agent_loop_with_a_function_call_and_its_output(server):
    client = server.client()
    first = client.responses.create(model=MODEL, input=AGENT, tools=[RESPONSES_TOOL], reasoning={"effort": "low"})
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    assert first.output[0].content[0].text == "Need the weather."
    call = first.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 20}'}],
        tools=[RESPONSES_TOOL],
    )
    assert second.output_text == "It is 20 degrees in Paris."
    assert second.status == "completed" and second.usage.input_tokens > first.usage.input_tokens
    # the same loop with the history sent back by the client instead of stored
    items = [{"role": "user", "content": AGENT}, *[i.model_dump(exclude_none=True) for i in first.output]]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 20}'})
    again = client.responses.create(model=MODEL, input=items, tools=[RESPONSES_TOOL])
    assert again.output_text == second.output_text and again.usage.input_tokens == second.usage.input_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_responses_stream_events_in_order(server):
    events = list(server.client().responses.create(model=MODEL, input=AGENT, tools=[RESPONSES_TOOL], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Need the weather."
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == '{"city":"Paris"}'
    done = events[-1].response
    assert [i.type for i in done.output] == ["reasoning", "function_call"] and done.output[1].arguments == arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert (
        added
        == [e.item.type for e in events if e.type == "response.output_item.done"]
        == ["reasoning", "function_call"]
    )
    final = list(
        server.client().responses.create(
            model=MODEL, input=SCRIPT + "<|channel|>final<|message|>Hi!<|return|>", stream=True
        )
    )
    assert "".join(e.delta for e in final if e.type == "response.output_text.delta") == "Hi!"
    assert final[-1].response.output_text == "Hi!"


def test_responses_render_instructions_and_reasoning_effort(server):
    out = server.client().responses.create(
        model=MODEL, input=ECHO, instructions="Speak like a pirate.", reasoning={"effort": "high"}
    )
    assert "Reasoning: high" in out.output_text and "# Instructions\n\nSpeak like a pirate." in out.output_text


def test_responses_cut_by_max_output_tokens_are_incomplete(server):
    out = server.client().responses.create(model=MODEL, input=LOOP + "la ", max_output_tokens=20)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.output_tokens == 20


# ---- load and faults -------------------------------------------------------------------------------------------
def test_past_the_queue_bound_requests_get_429_and_disconnects_free_the_slots(server):
    # this server runs 2 sequences and queues 2 more: 4 in flight at most
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LOOP + "tick "}],
        "max_tokens": 12000,
        "stream": True,
    }
    with httpx.Client(base_url=server.url, timeout=60) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(4)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in opened] == [200] * 4
            server.wait_metric("ossq_requests_in_flight", lambda v: v == 4)
            with pytest.raises(openai.RateLimitError) as refused:
                ask(server, SCRIPT + "<|channel|>final<|message|>x<|return|>")
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["code"] == "rate_limit_exceeded"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    server.wait_metric("ossq_requests_in_flight", lambda v: v == 0)
    server.wait_metric("ossq_kv_blocks_used", lambda v: v == 0)
    assert ask(server, SCRIPT + "<|channel|>final<|message|>Back.<|return|>").choices[0].message.content == "Back."


def test_a_non_streaming_client_that_disconnects_cancels_its_request(server):
    async def leave_early() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": LOOP + "tock "}], "max_tokens": 12000}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    before = server.metrics().get('ossq_requests_finished_total{reason="cancelled"}', 0)
    asyncio.run(leave_early())
    server.wait_metric('ossq_requests_finished_total{reason="cancelled"}', lambda v: v == before + 1)
    server.wait_metric("ossq_kv_blocks_used", lambda v: v == 0)


def test_an_engine_failure_is_a_500_in_openais_shape_and_the_server_goes_on(server):
    with pytest.raises(openai.InternalServerError) as failed:
        ask(server, CRASH)
    assert failed.value.body["type"] == "server_error" and "scripted failure" in failed.value.body["message"]
    streamed = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": CRASH}], "stream": True},
        timeout=60,
    )
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"  # said in the stream
    server.wait_metric("ossq_kv_blocks_used", lambda v: v == 0)
    assert ask(server, SCRIPT + "<|channel|>final<|message|>Fine.<|return|>").choices[0].message.content == "Fine."
