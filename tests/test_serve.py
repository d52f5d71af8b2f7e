"""`ossq serve` as a client sees it: a real server process on loopback, serving the tiny synthetic
checkpoint, driven by OpenAI's own Python client (and raw HTTP where the client would hide the wire).

The tiny model's weights are random, so its completions are not harmony: they reach the client as
content, and the oracle for their tokens is `ossq.generate` run in this process on the same checkpoint.
Harmony parsing, tool calls and channel routing are tested end to end in test_serve_harmony.py, with a
model whose logits force scripted completions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "sk-test-ossq"
STARTUP_TIMEOUT_S = 120


class ServerProcess:
    """A server started as a subprocess; `url` once it printed its "listening on" line."""

    def __init__(self, argv: list[str], *, api_key: str | None = None) -> None:
        self.api_key = api_key
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()
        self.url: str | None = None

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                found = re.search(r"listening on (http://\S+)", line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(STARTUP_TIMEOUT_S) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=60)

    def post(self, path: str, body, *, headers: dict | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **(headers or {})} if self.api_key else headers
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(ossq_\S+) ([-+0-9.e]+)$", text, re.M)}

    def wait_metric(self, name: str, ok, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(name)
            if value is not None and ok(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is {value} after {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ossq_serve(checkpoint: Path, *flags: str, api_key: str | None = API_KEY) -> ServerProcess:
    key = ["--api-key", api_key] if api_key else []
    argv = [sys.executable, "-m", "ossq.cli", "serve", "-m", str(checkpoint), "--port", "0", *key, *flags]
    return ServerProcess(argv, api_key=api_key)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, "--max-num-seqs", "8", "--max-queue", "64", "--kv-cache-tokens", "16384")
    yield s
    s.stop()


GREEDY = {"temperature": 0.0}
MODEL = "tiny"  # the served name: the checkpoint directory's


# ---- models, health, metrics, auth --------------------------------------------------------------------
def test_models_lists_the_served_model(server, tiny_checkpoint):
    client = server.client()
    assert [m.id for m in client.models.list()] == [tiny_checkpoint.name]
    assert client.models.retrieve(tiny_checkpoint.name).owned_by == "ossq"


def test_health_and_metrics_need_no_key_and_metrics_are_prometheus_text(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("requests_total", "kv_blocks_used", "kv_blocks_total", "requests_waiting", "prefix_cache_hit_rate"):
        assert re.search(rf"^# TYPE ossq_{name} (counter|gauge)$", text, re.M), name
    assert server.metrics()["ossq_kv_blocks_total"] == 16384 // 16


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_a_missing_or_wrong_api_key_is_401_in_openais_shape(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and set(r.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    if key is not None:  # the client itself refuses to send no key
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key=key).models.list()


# ---- generation against the in-process oracle ---------------------------------------------------------------
def _alone(oracle, prompt, max_tokens: int) -> str:
    import ossq
    from ossq.engine.sampling import SamplingParams

    model, tokenizer = oracle
    return ossq.generate(model, tokenizer, prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0))


def test_completions_return_what_the_model_generates_alone(server, oracle):
    out = server.client().completions.create(model=MODEL, prompt="The capital of France", max_tokens=12, **GREEDY)
    assert out.choices[0].text == _alone(oracle, "The capital of France", 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(oracle[1].encode("The capital of France")),
        12,
    )


def test_chat_completion_renders_harmony_and_returns_the_models_text_as_content(server, oracle):
    from ossq.harmony import render_prompt

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    out = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    prompt = render_prompt("What is 2 + 2?")
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == 10
    # not harmony: every token's text is content; special tokens never are
    expected = _alone(oracle, prompt, 10)
    assert out.choices[0].message.content == re.sub(r"<\|[a-z_0-9]+\|>", "", expected)
    assert getattr(out.choices[0].message, "reasoning_content", None) is None
    assert out.choices[0].finish_reason == "length"


def test_streamed_chat_equals_the_non_streamed_one_and_ends_with_a_usage_chunk(server):
    client = server.client()
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: the prefix cache


def test_32_concurrent_greedy_requests_give_exactly_what_each_gives_alone(server):
    prompts = [f"Request {i}: tell me about the number {i * 37 % 101}." for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]
    client = server.client()

    def one(prompt: str, n: int):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, **GREEDY)
        return out.choices[0].text, out.usage.completion_tokens, out.choices[0].finish_reason

    alone = [one(p, n) for p, n in zip(prompts, lengths, strict=True)]

    async def together():
        aclient = server.async_client()
        outs = await asyncio.gather(
            *(
                aclient.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY)
                for p, n in zip(prompts, lengths, strict=True)
            )
        )
        return [(o.choices[0].text, o.usage.completion_tokens, o.choices[0].finish_reason) for o in outs]

    assert asyncio.run(together()) == alone
    assert server.metrics()["ossq_requests_in_flight"] == 0


def test_a_client_that_disconnects_mid_stream_cancels_its_request_and_frees_its_blocks(server):
    before = server.metrics()
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 3000, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as r:
        lines = r.iter_lines()  # kept: closing this generator would close the response
        assert next(lines).startswith("data: ")  # the role chunk
        server.wait_metric("ossq_kv_blocks_used", lambda v: v > 0)  # the request holds its blocks
    # the client is gone: its request leaves the engine and gives its blocks back, long before 3000 tokens
    server.wait_metric("ossq_kv_blocks_used", lambda v: v == 0)
    server.wait_metric("ossq_requests_running", lambda v: v == 0)
    after = server.wait_metric('ossq_requests_finished_total{reason="cancelled"}', lambda v: v >= 1)
    assert after == before.get('ossq_requests_finished_total{reason="cancelled"}', 0) + 1
    assert server.metrics()["ossq_generation_tokens_total"] - before["ossq_generation_tokens_total"] < 3000


# ---- bad input: OpenAI-shaped 4xx, never a 500, never the others' problem -------------------------------------
USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "delete_everything", "arguments": "{}"}}
BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", {}, 400, "messages", "required"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "list"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "user"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n", "less than or equal to 1"),
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "max"}, 400, "reasoning_effort", "'low'"),
    ("/v1/chat/completions", {"messages": USER, "model": "gpt-4o"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, 400, "messages", "context"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": 1}, 400, "presence_penalty", "repetition_penalty"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content",
        "only text",
    ),
    (
        "/v1/chat/completions",
        {"messages": [*USER, {"role": "assistant", "tool_calls": [CALL]}], "tools": [WEATHER]},
        400,
        "messages.1.tool_calls.0.function.name",
        "'delete_everything' is not a declared function",
    ),
    (
        "/v1/chat/completions",
        {"messages": [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "{}"}], "tools": [WEATHER]},
        400,
        "messages.1.tool_call_id",
        "matches no tool call",
    ),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", "needs at least one"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "False"),
    ("/v1/completions", {"prompt": [300000]}, 400, "prompt", "token ids"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id", "no response"),
    (
        "/v1/responses",
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
        400,
        "input.0.call_id",
        "no function_call",
    ),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools.0.type", "function"),
    ("/v1/nowhere", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "says"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_in_openais_shape_that_says_what_to_fix(server, path, body, status, param, says):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert says in error["message"]


def test_the_server_serves_on_after_bad_input(server):
    for path, body, *_ in BAD_REQUESTS:
        server.post(path, body)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert (
        server.client().completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens
        == 2
    )
    assert server.metrics()["ossq_requests_in_flight"] == 0


# ---- shutdown ------------------------------------------------------------------------------------------------
def test_sigterm_lets_the_request_in_flight_finish_and_exits_cleanly(tiny_checkpoint):
    s = ossq_serve(tiny_checkpoint, api_key=None)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "stream": True, **GREEDY}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 30  # most of the 40 tokens carry text
        assert s.proc.wait(30) == 0
        assert "Application shutdown complete" in s.log
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()


# ---- the command ----------------------------------------------------------------------------------------------
def test_serve_without_fastapi_names_the_extra_to_install(tiny_checkpoint, monkeypatch, capsys):
    from ossq import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    monkeypatch.delitem(sys.modules, "ossq.serve.app", raising=False)
    assert cli.main(["serve", "-m", str(tiny_checkpoint)]) == 2
    assert "pip install 'ossq[serve]'" in capsys.readouterr().err


def test_serve_on_a_busy_port_fails_before_loading_the_model(tiny_checkpoint, capsys):
    import socket

    from ossq import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "-m", str(tiny_checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
