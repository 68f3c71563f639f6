"""The HTTP face of the server: FastAPI endpoints over a running ``Scheduler``.

    GET  /                     the routing viewer page (static/index.html)
    GET  /health               liveness and the engine's load
    GET  /v1/models            the one served model (+ its MoE layout, an extension)
    POST /v1/completions       prompt -> text, streamed (server-sent events) or not
    POST /v1/chat/completions  messages -> chat template -> the same
    GET  /v1/moe/stats         load per expert per layer since start, decode batch sizes

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx
status, so the official clients raise their typed exceptions. A request whose client goes
away is cancelled, which frees its sequence slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.inference.sampling import SamplingParams
from moekit.serve.protocol import ChatRequest, CompletionRequest, ResponseShape, error_body
from moekit.serve.scheduler import ContextTooLong, Event, QueueFull, Request as SeqRequest, Scheduler

PAGE = Path(__file__).with_name("static") / "index.html"
_DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class ServedTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ServeState:
    """Everything the endpoints share; built by ``moekit serve`` or a test."""

    scheduler: Scheduler
    tokenizer: ServedTokenizer
    model_name: str
    vocab_size: int
    stop_ids: frozenset[int] = frozenset()  # EOS ids of the tokenizer and generation_config.json
    chat_prompt: Callable[[list[dict]], list[int]] | None = None  # messages -> prompt ids; None: no template
    api_key: str | None = None
    defaults: dict = field(default_factory=dict)  # generation_config.json: temperature, top_p, top_k, ...
    started: float = field(default_factory=time.time)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


def _offload_stats(state: ServeState) -> dict:
    """The expert cache's counters when the experts are offloaded (bytes per token over every
    token the engine ran, prompts included); nothing otherwise."""
    engine = state.scheduler.engine
    rt = getattr(engine.model, "offload", None)
    if rt is None:
        return {}
    st = engine.stats
    return {"offload": rt.summary(tokens=st.prefill_tokens + st.decode_tokens)}


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _install_error_handlers(app)
    auth = Depends(_check_key(state))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.scheduler.load()}

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/moe/stats", dependencies=[auth])
    async def moe_stats():
        return {**state.scheduler.stats.snapshot(), "engine": state.scheduler.load(),
                "uptime_s": round(time.time() - state.started, 3), **_offload_stats(state)}

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request):
        _check_common(state, body)
        return await _generate(state, request, body, ResponseShape("completion", state.model_name),
                               _completion_prompt(state, body), body.max_tokens)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(body: ChatRequest, request: Request):
        _check_common(state, body)
        if state.chat_prompt is None:
            raise ApiError(400, f"model {state.model_name!r} has no chat template; use /v1/completions")
        try:
            ids = state.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as e:  # a content part we cannot read, or the template's raise_exception
            raise ApiError(400, f"messages: {e}", param="messages") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _generate(state, request, body, ResponseShape("chat", state.model_name), ids, limit)

    return app


def _model_card(state: ServeState) -> dict:
    s = state.scheduler
    return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "moekit",
            "max_model_len": s.max_len, "moe": {"num_experts": s.stats.num_experts}}


def _check_key(state: ServeState):
    async def check(request: Request) -> None:
        if state.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           "authentication_error", "invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:
            param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_value", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)


def _check_common(state: ServeState, body) -> None:
    if body.model != state.model_name:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       code="model_not_found", param="model")
    if body.n != 1:
        raise ApiError(400, f"n must be 1, got {body.n}", param="n")


def _completion_prompt(state: ServeState, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: send one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return state.tokenizer.encode(prompt)
    bad = [i for i in prompt if not 0 <= i < state.vocab_size]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {state.vocab_size})",
                       param="prompt")
    return list(prompt)


def _sampling(state: ServeState, body, max_tokens: int | None, prompt_len: int) -> SamplingParams:
    d = state.defaults
    top_k = body.top_k if body.top_k is not None else d.get("top_k")
    if max_tokens is None:  # chat without a limit: whatever the context leaves
        max_tokens = max(1, state.scheduler.max_len - prompt_len)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    pick = lambda name, default: getattr(body, name) if getattr(body, name) is not None else d.get(name, default)  # noqa: E731
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=None if top_k in (None, 0, -1) else top_k,
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=body.seed,
            stop=body.stop_list(),
            stop_token_ids=tuple(state.stop_ids),
        )
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None


async def _generate(state: ServeState, request: Request, body, shape: ResponseShape, prompt_ids: list[int],
                    max_tokens: int | None):
    params = _sampling(state, body, max_tokens, len(prompt_ids))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    seq = SeqRequest(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                     want_routing=body.moe)
    try:
        state.scheduler.submit(seq)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", "too_many_requests") from None
    except ContextTooLong as e:
        raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if body.stream:
        return StreamingResponse(_stream(state, seq, events, shape, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(state, request, seq, events, shape)


async def _collect(state: ServeState, request: Request, seq: SeqRequest, events: asyncio.Queue,
                   shape: ResponseShape) -> JSONResponse:
    """Wait for the whole completion, cancelling it if the client hangs up meanwhile."""
    pieces: list[str] = []
    try:
        while True:
            try:
                ev: Event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    state.scheduler.cancel(seq)
                    return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
                continue
            if ev.kind == "text":
                pieces.append(ev.text)
            elif ev.kind == "done":
                return JSONResponse(shape.full("".join(pieces), ev.finish_reason, ev.usage))
            else:
                raise ApiError(500, ev.text, "server_error")
    except asyncio.CancelledError:
        state.scheduler.cancel(seq)
        raise


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(state: ServeState, seq: SeqRequest, events: asyncio.Queue, shape: ResponseShape,
                  include_usage: bool):
    """Server-sent events: [role chunk (chat)], text chunks, a content-less chunk with the
    finish_reason, [a usage chunk with choices: []], then ``data: [DONE]``."""
    done = False
    try:
        if shape.kind == "chat":
            yield _sse(shape.chunk("", role=True, with_usage_field=include_usage))
        while True:
            ev: Event = await events.get()
            if ev.kind == "text":
                yield _sse(shape.chunk(ev.text, experts=ev.token_experts, with_usage_field=include_usage))
                continue
            done = True
            if ev.kind == "error":
                yield _sse(error_body(ev.text, "server_error"))
            else:
                last = None if shape.kind == "chat" else ""
                yield _sse(shape.chunk(last, ev.finish_reason, with_usage_field=include_usage))
                if include_usage:
                    yield _sse(shape.usage_chunk(ev.usage))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:  # the client left mid-stream (the generator was closed or cancelled)
            state.scheduler.cancel(seq)


__all__ = ["build_app", "ServeState", "ApiError", "PAGE"]
