"""`ossq serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn). docs/serve.md.

Routes: GET /v1/models, /health, /metrics (Prometheus text); POST /v1/chat/completions,
/v1/responses (GET /v1/responses/{id} too) and /v1/completions, each streaming as server-sent events
when asked. Every generation is one engine request, batched continuously with the others by the
engine thread (serve/worker.py). At most `max_num_seqs + max_queue` requests are in flight; past that
a request is answered 429 at once. A client that disconnects cancels its request, and its KV blocks
are free before the next engine step. Errors are OpenAI's shape (serve/protocol.py); a bad request is
a 4xx, never a 500, and never touches another request. Under `--tp N` this process is rank 0, and the
engine thread's calls reach the other ranks' engines too (serve/mirror.py). Under `--dp N` the server
holds N engine replicas, each with its own thread, and sends every request to the replica whose prefix
cache holds most of its prompt (a conversation's next turn goes where its last one ran), unless that
replica is a whole batch busier than the idlest.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import secrets
import signal
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ossq.engine.constrain import FinalJson
from ossq.engine.engine import Engine
from ossq.engine.generate import stop_tokens
from ossq.engine.parallel import SINGLE, Parallel, ParallelError
from ossq.errors import OssqError
from ossq.serve.completion import Completion, Delta
from ossq.serve.mirror import Mirror
from ossq.serve.prompts import Prompt, chat_prompt, responses_prompt
from ossq.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    MessageItem,
    ResponsesRequest,
    chat_usage,
    model_card,
    now,
    parse,
    read_json,
    responses_usage,
    stop_strings,
)
from ossq.serve.responses import ResponseBuilder, ResponseStore, new_id
from ossq.serve.worker import Accepted, EngineWorker, Failed, Finished, Job, Logprob, Token, WorkerStats
from ossq.tokenizer import Tokenizer, o200k_harmony

log = logging.getLogger("ossq.serve")

MAX_QUEUE = 256  # requests waiting for a sequence slot, beyond max_num_seqs running; past that, 429
SHUTDOWN_TIMEOUT_S = 30  # on SIGTERM, how long in-flight requests may still run before they are cancelled


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = MAX_QUEUE
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S


@dataclass
class _Replica:
    """One engine and its thread (`--dp`: one of several, alike)."""

    engine: Engine
    mirror: Mirror | None = None
    worker: EngineWorker | None = None
    in_flight: int = 0

    def cached_blocks(self, prompt: Sequence[int]) -> int:
        """Full blocks of `prompt` in this replica's prefix cache (a read of the engine thread's index:
        at worst out of date by a step, which only makes a routing choice less good)."""
        return len(self.engine.blocks.match(prompt)[0])


@dataclass
class _State:
    replicas: list[_Replica]
    tokenizer: Tokenizer
    config: ServeConfig
    store: ResponseStore = field(default_factory=ResponseStore)
    in_flight: int = 0
    started: int = field(default_factory=now)
    requests: dict[str, int] = field(default_factory=dict)  # accepted generations, by endpoint
    rejected: int = 0  # 429s

    @property
    def engine(self) -> Engine:
        """The first replica's engine: every replica has the same model and settings."""
        return self.replicas[0].engine

    @property
    def workers(self) -> list[EngineWorker]:
        return [r.worker for r in self.replicas if r.worker is not None]

    @property
    def limit(self) -> int:
        return len(self.replicas) * self.engine.config.max_num_seqs + self.config.max_queue

    def route(self, prompt: Sequence[int]) -> _Replica:
        """The replica holding the longest cached prefix of `prompt` among those less than a batch
        (max_num_seqs) busier than the idlest; the idler of equals."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        idlest = min(r.in_flight for r in self.replicas)
        fair = [r for r in self.replicas if r.in_flight < idlest + self.engine.config.max_num_seqs]
        return max(fair, key=lambda r: (r.cached_blocks(prompt), -r.in_flight))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def room(self, prompt_tokens: int) -> int:
        """max_tokens when the request gives none: whatever fits the context and the KV pool."""
        limit = self.engine.kv_cache_tokens
        if self.engine.config.max_kv_size is None:
            limit = min(limit, self.engine.model.config.max_position_embeddings)
        return max(1, limit - prompt_tokens + 1)


class _ClientGone(Exception):
    pass


_GONE = object()  # put on a job's queue when its (non-streaming) client disconnects


@dataclass
class _Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    cached_tokens: int = 0


class _Generation:
    """One request on the engine, seen from its handler: admission (429 past the bound, 4xx when the
    engine refuses it), its events, and cancellation when the handler leaves early."""

    def __init__(self, state: _State, job: Job, endpoint: str) -> None:
        self.state, self.job, self.endpoint = state, job, endpoint
        self.replica = state.route(job.prompt)
        self.outcome = _Outcome(prompt_tokens=len(job.prompt))
        self._admitted = self._done = False

    async def start(self) -> None:
        state = self.state
        if state.in_flight >= state.limit:
            state.rejected += 1
            raise ApiError(
                429,
                f"the server is at capacity ({state.in_flight} requests in flight); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        state.in_flight += 1
        self.replica.in_flight += 1
        self._admitted = True
        self.replica.worker.submit(self.job)
        try:
            event = await self.job.events.get()
        except BaseException:
            self.close()
            raise
        if isinstance(event, Failed):
            self._done = True
            self.close()
            raise _failure(event.error)
        assert isinstance(event, Accepted)
        state.requests[self.endpoint] = state.requests.get(self.endpoint, 0) + 1

    async def events(self) -> AsyncIterator[Token | Finished]:
        while True:
            event = await self.job.events.get()
            if event is _GONE:
                raise _ClientGone
            if isinstance(event, Failed):
                self._done = True
                raise _failure(event.error)
            if isinstance(event, Finished):
                self._done = True
                self.outcome.prompt_tokens, self.outcome.cached_tokens = event.prompt_tokens, event.cached_tokens
                if event.reason == "abort":
                    raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            else:
                self.outcome.cached_tokens = event.cached_tokens
            yield event
            if self._done:
                return

    def close(self) -> None:
        """The handler is done: cancel the request if it still runs, and leave the in-flight count."""
        if not self._done:
            self._done = True
            self.replica.worker.cancel(self.job)
        if self._admitted:
            self._admitted = False
            self.state.in_flight -= 1
            self.replica.in_flight -= 1


def _failure(error: Exception) -> ApiError:
    if isinstance(error, OssqError) and not isinstance(error, ParallelError):  # that one is the server's fault
        return ApiError.from_ossq(error)
    return ApiError(500, f"the engine failed: {type(error).__name__}: {error}", type="server_error")


async def _deltas(gen: _Generation, completion: Completion) -> AsyncIterator[list[Delta]]:
    """The completion's deltas as tokens arrive; sets `gen.outcome.finish_reason` at the end."""
    opening = completion.opening()
    if opening:
        yield opening
    async for event in gen.events():
        if isinstance(event, Token):
            deltas = completion.add(event.token, event.logprob)
            if completion.stopped:  # a stop string: the rest is not wanted
                gen.close()
                last, gen.outcome.finish_reason = completion.finish("stop")
                yield deltas + last
                return
            if deltas:
                yield deltas
        else:
            last, gen.outcome.finish_reason = completion.finish(event.reason)
            if last:
                yield last


async def _run_to_end(gen: _Generation, completion: Completion, request: Request, *, on_deltas=None) -> None:
    """Consume a non-streaming generation (handing its deltas to `on_deltas`), cancelling it if the
    client disconnects meanwhile."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gen.job.events.put_nowait(_GONE)

    watcher = asyncio.create_task(watch())
    try:
        async for deltas in _deltas(gen, completion):
            if on_deltas is not None:
                on_deltas(deltas)
    finally:
        watcher.cancel()
        gen.close()


class _EventStream(StreamingResponse):
    """Server-sent events that close their generation however the response ends — even when the
    client leaves before the first event, and the event generator never starts (its `finally` with it)."""

    def __init__(self, gen: _Generation, events: AsyncIterator[str]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


def _data(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _guarded(gen: _Generation, body: AsyncIterator[str], error: callable) -> AsyncIterator[str]:
    """A stream's events; an error after the response began becomes a last event (`error(ApiError)`)."""
    try:
        async for text in body:
            yield text
    except ApiError as e:
        yield error(e)
    except _ClientGone:
        return
    except Exception as e:  # a bug: report it in the stream, keep serving
        log.exception("a streaming response failed")
        yield error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
    finally:
        gen.close()


# ---- logprobs in OpenAI's shapes --------------------------------------------------------------------------
def _token_text(token: int) -> str:
    return o200k_harmony().decode_single_token_bytes(token).decode("utf-8", errors="replace")


def _token_bytes(token: int) -> list[int]:
    return list(o200k_harmony().decode_single_token_bytes(token))


def _chat_logprob(lp: Logprob) -> dict:
    top = [{"token": _token_text(t), "logprob": v, "bytes": _token_bytes(t)} for t, v in lp.top]
    return {"token": _token_text(lp.token), "logprob": lp.logprob, "bytes": _token_bytes(lp.token), "top_logprobs": top}


def _completion_logprobs(lps: list[Logprob]) -> dict:
    tokens = [_token_text(lp.token) for lp in lps]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token_text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(
    engines: Engine | Sequence[Engine], tokenizer: Tokenizer, config: ServeConfig, mirror: Mirror | None = None
) -> FastAPI:
    """The app over `engines` (one, or the `--dp` replicas), each changed by its own engine thread;
    the first through `mirror` (default: alone; under --tp there is one engine)."""
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    state = _State([_Replica(e, mirror if i == 0 else None) for i, e in enumerate(engines)], tokenizer, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        for r in state.replicas:
            r.worker = EngineWorker(r.engine, asyncio.get_running_loop(), r.mirror)
            r.worker.start()
        try:
            yield
        finally:
            for w in state.workers:
                w.stop(timeout=config.shutdown_timeout)

    app = FastAPI(title="ossq", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ossq = state
    _add_error_handlers(app)
    app.include_router(_open_routes(state))
    app.include_router(_api_routes(state), dependencies=[Depends(_authorize(config.api_key))])
    return app


def _authorize(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not given:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(_ClientGone)
    async def gone(_request: Request, _e: _ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(_request: Request, e: Exception) -> JSONResponse:
        log.exception("a request failed")
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def _open_routes(state: _State) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        ok = len(state.workers) == len(state.replicas) and all(w.alive for w in state.workers)
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(state), media_type="text/plain; version=0.0.4")

    return router


def _api_routes(state: _State) -> APIRouter:
    router = APIRouter(prefix="/v1")
    name = state.config.model_name

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name, state.started)]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        state.check_model(model_id)
        return model_card(name, state.started)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, read_json(await request.body()))
        return await _chat(state, req, request)

    @router.post("/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, read_json(await request.body()))
        return await _completions(state, req, request)

    @router.post("/responses")
    async def responses(request: Request):
        req = ResponsesRequest.parse(read_json(await request.body()))
        return await _responses(state, req, request)

    @router.get("/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        stored = state.store.get(response_id)
        if stored is None:
            raise ApiError(404, f"no response with id {response_id!r} is stored", param="response_id", code="not_found")
        return stored.response

    return router


# ---- POST /v1/chat/completions ----------------------------------------------------------------------------
def _constraint(state: _State, prompt: Prompt) -> FinalJson | None:
    """The final channel held to the prompt's response format, if it has one."""
    fmt = prompt.response_format
    return None if fmt is None else FinalJson.for_schema(state.tokenizer, fmt.schema)


async def _chat(state: _State, req: ChatRequest, request: Request):
    state.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = chat_prompt(req)
    sampling = req.sampling()
    completion = Completion(
        state.tokenizer, harmony=True, functions=prompt.functions, stop=stop_strings(req.stop), prefill=prompt.prefill
    )
    max_tokens = req.max_completion_tokens or req.max_tokens or state.room(len(prompt.tokens))
    stops = stop_tokens(state.engine.model.config)
    top = (req.top_logprobs or 0) if req.logprobs else None
    job = Job(prompt.tokens, sampling, max_tokens, stops, top, _constraint(state, prompt))
    gen = _Generation(state, job, "chat")
    await gen.start()
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": now(), "model": state.config.model_name}
    if req.stream:
        events = _chat_events(gen, completion, head, req)
        return _EventStream(gen, _guarded(gen, events, lambda e: _data(e.body()) + _data("[DONE]")))
    await _run_to_end(gen, completion, request)
    return _chat_response(gen, completion, head, req)


def _chat_response(gen: _Generation, completion: Completion, head: dict, req: ChatRequest) -> dict:
    calls = [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
        for c in completion.calls
    ]
    message = {
        "role": "assistant",
        "content": completion.text if completion.text or not calls else None,
        "reasoning_content": completion.reasoning_text or None,
    }
    if calls:
        message["tool_calls"] = calls
    logprobs = {"content": [_chat_logprob(lp) for lp in completion.logprobs]} if req.logprobs else None
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": gen.outcome.finish_reason}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(gen, completion, chat_usage)}


async def _chat_events(gen: _Generation, completion: Completion, head: dict, req: ChatRequest) -> AsyncIterator[str]:
    usage_field = {"usage": None} if req.include_usage else {}

    def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _data({**head, "object": "chat.completion.chunk", "choices": [choice], **usage_field})

    yield chunk({"role": "assistant", "content": ""})
    async for deltas in _deltas(gen, completion):
        for d in deltas:
            yield chunk(*_chat_delta(d, req.logprobs))
    yield chunk({}, gen.outcome.finish_reason)
    if req.include_usage:
        usage = _usage(gen, completion, chat_usage)
        yield _data({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    yield _data("[DONE]")


def _chat_delta(d: Delta, with_logprobs: bool) -> tuple[dict, None, dict | None]:
    if d.kind == "reasoning":
        return {"reasoning_content": d.text}, None, None
    if d.kind == "call":
        call = {"index": d.call, "id": d.call_id, "type": "function", "function": {"name": d.name, "arguments": ""}}
        return {"tool_calls": [call]}, None, None
    if d.kind == "arguments":
        return {"tool_calls": [{"index": d.call, "function": {"arguments": d.text}}]}, None, None
    logprobs = {"content": [_chat_logprob(lp) for lp in d.logprobs]} if with_logprobs else None
    return {"content": d.text}, None, logprobs


def _usage(gen: _Generation, completion: Completion, shape) -> dict:
    o = gen.outcome
    return shape(o.prompt_tokens, len(completion.tokens), cached=o.cached_tokens, reasoning=completion.reasoning_tokens)


# ---- POST /v1/completions ---------------------------------------------------------------------------------
async def _completions(state: _State, req: CompletionRequest, request: Request):
    state.check_model(req.model)
    prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
    ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    stops = stop_tokens(state.engine.model.config)
    completion = Completion(state.tokenizer, harmony=False, stop=stop_strings(req.stop), stop_tokens=stops)
    job = Job(ids, req.sampling(), req.max_tokens, stops, req.logprobs)
    gen = _Generation(state, job, "completions")
    await gen.start()
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": now()}
    head["model"] = state.config.model_name
    with_logprobs = req.logprobs is not None
    if req.stream:
        events = _completion_events(gen, completion, head, req)
        return _EventStream(gen, _guarded(gen, events, lambda e: _data(e.body()) + _data("[DONE]")))
    await _run_to_end(gen, completion, request)
    logprobs = _completion_logprobs(completion.logprobs) if with_logprobs else None
    choice = {"text": completion.text, "index": 0, "logprobs": logprobs, "finish_reason": gen.outcome.finish_reason}
    return {**head, "choices": [choice], "usage": _usage(gen, completion, chat_usage)}


async def _completion_events(gen, completion: Completion, head: dict, req: CompletionRequest) -> AsyncIterator[str]:
    usage_field = {"usage": None} if req.include_usage else {}

    def chunk(text: str, finish_reason: str | None = None, lps: tuple[Logprob, ...] = ()) -> str:
        logprobs = _completion_logprobs(list(lps)) if req.logprobs is not None else None
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        return _data({**head, "choices": [choice], **usage_field})

    async for deltas in _deltas(gen, completion):
        for d in deltas:
            yield chunk(d.text, lps=d.logprobs)
    yield chunk("", gen.outcome.finish_reason)
    if req.include_usage:
        yield _data({**head, "choices": [], "usage": _usage(gen, completion, chat_usage)})
    yield _data("[DONE]")


# ---- POST /v1/responses -----------------------------------------------------------------------------------
async def _responses(state: _State, req: ResponsesRequest, request: Request):
    state.check_model(req.model)
    previous = []
    if req.previous_response_id is not None:
        stored = state.store.get(req.previous_response_id)
        if stored is None:
            raise ApiError(
                404,
                f"previous_response_id: no response with id {req.previous_response_id!r} is stored "
                f"(the server keeps the last {state.store.capacity}, in memory)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        previous = stored.items
    given = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else list(req.input)
    items = previous + given
    prompt = responses_prompt(req, items, first_new=len(previous))
    completion = Completion(state.tokenizer, harmony=True, functions=prompt.functions, prefill=prompt.prefill)
    max_tokens = req.max_output_tokens or state.room(len(prompt.tokens))
    stops = stop_tokens(state.engine.model.config)
    job = Job(prompt.tokens, req.sampling(), max_tokens, stops, constraint=_constraint(state, prompt))
    gen = _Generation(state, job, "responses")
    await gen.start()
    builder = ResponseBuilder(_response_skeleton(state, req))
    if req.stream:
        events = _response_events(state, gen, completion, builder, req, items)
        return _EventStream(gen, _guarded(gen, events, lambda e: _response_failed(builder, e)))
    await _run_to_end(gen, completion, request, on_deltas=lambda ds: [builder.add(d) for d in ds])
    _end_response(state, gen, completion, builder, req, items)
    return builder.response


def _response_skeleton(state: _State, req: ResponsesRequest) -> dict:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice or "auto"
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": now(),
        "status": "in_progress",
        "model": state.config.model_name,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning.effort if req.reasoning else None) or "medium", "summary": None},
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "max_output_tokens": req.max_output_tokens,
        "text": {
            "format": req.text.format.model_dump(by_alias=True) if req.text and req.text.format else {"type": "text"}
        },
        "truncation": "disabled",
        "metadata": req.metadata or {},
        "store": req.store,
    }


def _response_failed(builder: ResponseBuilder, e: ApiError) -> str:
    return "".join(_event(ev) for ev in builder.fail(e.message, e.code or e.type))


def _event(ev: dict) -> str:
    return f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n"


async def _response_events(state, gen, completion, builder, req, items) -> AsyncIterator[str]:
    for ev in builder.start():
        yield _event(ev)
    async for deltas in _deltas(gen, completion):
        for d in deltas:
            for ev in builder.add(d):
                yield _event(ev)
    for ev in _end_response(state, gen, completion, builder, req, items):
        yield _event(ev)


def _end_response(state, gen, completion, builder, req, items) -> list[dict]:
    events = builder.finish(gen.outcome.finish_reason, _usage(gen, completion, responses_usage))
    if req.store:
        state.store.put(copy.deepcopy(builder.response), items)
    return events


# ---- /metrics -----------------------------------------------------------------------------------------------
def _metrics(state: _State) -> str:
    s = WorkerStats.total([w.stats for w in state.workers]) if state.workers else None
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP ossq_{name} {help_text}", f"# TYPE ossq_{name} {kind}"])
        lines.extend(f"ossq_{name}{labels} {value:g}" for labels, value in samples)

    metric(
        "requests_total",
        "counter",
        "Generations accepted, by endpoint.",
        [(f'{{endpoint="{e}"}}', n) for e, n in sorted(state.requests.items())] or [("", 0)],
    )
    metric("requests_rejected_total", "counter", "Requests refused with 429 (queue full).", [("", state.rejected)])
    metric(
        "requests_in_flight",
        "gauge",
        "Generations the server holds (running, queued or being admitted).",
        [("", state.in_flight)],
    )
    if len(state.replicas) > 1:
        metric(
            "replica_requests_in_flight",
            "gauge",
            "Of those, each --dp replica's.",
            [(f'{{replica="{i}"}}', r.in_flight) for i, r in enumerate(state.replicas)],
        )
    if s is not None:
        metric(
            "requests_finished_total",
            "counter",
            "Generations ended, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(s.finished.items())] or [("", 0)],
        )
        metric("requests_running", "gauge", "Requests the engine runs.", [("", s.running)])
        metric("requests_waiting", "gauge", "Requests queued in the engine for a slot or KV blocks.", [("", s.waiting)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", s.prompt_tokens)])
        metric(
            "cached_prompt_tokens_total",
            "counter",
            "Of those, tokens the prefix cache supplied.",
            [("", s.cached_tokens)],
        )
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
        metric(
            "prefix_cache_hit_rate",
            "gauge",
            "Cached over all prompt tokens of finished requests.",
            [("", s.prefix_cache_hit_rate)],
        )
        metric("kv_blocks_used", "gauge", "KV-cache blocks held by requests.", [("", s.blocks_used)])
        metric("kv_blocks_total", "gauge", "KV-cache blocks in the pool.", [("", s.blocks_total)])
        metric("engine_steps_total", "counter", "Engine steps run.", [("", s.steps)])
    if s is not None and s.speculation is not None:
        d = s.speculation
        metric("draft_tokens_total", "counter", "Draft tokens proposed (--draft-model).", [("", d.draft_tokens)])
        metric("draft_tokens_accepted_total", "counter", "Of those, tokens accepted.", [("", d.accepted_tokens)])
    return "\n".join(lines) + "\n"


# ---- running it -------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn's server, announcing its address once the app is up, and taking SIGINT/SIGTERM as a
    graceful stop without re-raising the signal afterwards (uvicorn would, and the CLI would then report
    an interruption after a clean shutdown). It also stops once the engine thread gave up (`error`: under
    --tp the ranks fell out of step, and nothing more can be served)."""

    def __init__(self, config: uvicorn.Config, state: _State) -> None:
        super().__init__(config)
        self.state = state

    async def on_tick(self, counter: int) -> bool:
        failed = any(w.error is not None for w in self.state.workers)
        return await super().on_tick(counter) or failed

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            print(f"ossq serve: listening on http://{host}:{port}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(
    engine: Engine | Sequence[Engine],
    tokenizer: Tokenizer,
    config: ServeConfig,
    sock: socket.socket,
    *,
    log_level: str = "info",
    parallel: Parallel = SINGLE,
) -> None:
    """Serve on `sock` (from `listen`) until SIGINT or SIGTERM; then stop taking connections, let
    in-flight requests finish for up to `config.shutdown_timeout` seconds, cancel what is left and
    return. The "listening on" line printed once the app is up names the address. Under --tp
    (`parallel`, rank 0) the other ranks run `mirror.follow` meanwhile, and are stopped on the way out;
    an engine thread that lost them ends the server with its ParallelError. A sequence of engines is
    the `--dp` replicas (module docstring)."""
    engines = [engine] if isinstance(engine, Engine) else list(engine)
    if parallel.active and len(engines) > 1:
        raise OssqError("--dp with --tp is not supported; choose one")
    app = create_app(engines, tokenizer, config, Mirror(engines[0], parallel))
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["ossq"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    server = _Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            log_config=log_config,
            access_log=log_level == "debug",
            timeout_graceful_shutdown=max(1, round(config.shutdown_timeout)),
            lifespan="on",
        ),
        app.state.ossq,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        workers = app.state.ossq.workers
        for worker in workers:  # a forced exit skips the lifespan's shutdown: the followers still hear stop
            worker.stop(timeout=config.shutdown_timeout)
    for worker in workers:
        if worker.error is not None:
            raise worker.error


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or an OssqError saying why not — checked
    before the model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OssqError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
