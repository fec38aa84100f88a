"""OpenAI-compatible HTTP in front of an EngineService: a FastAPI app served by uvicorn.

Routes: GET /health, /ready, /metrics (Prometheus), /v1/models, /openapi.json; POST
/v1/completions, /v1/chat/completions (`"stream": true` answers as server-sent events).
Bodies are the pydantic models of engine/http_models.py. Beyond OpenAI's fields a request may
set `top_k`, `ignore_eos` and `guided_choice` (a list of strings the answer must be one of, as
in vLLM). Errors are JSON `{"error": {"message", "type", "param", "code"}}`: 400 bad request,
401 no key, 404, 413 / 415 / 408 (engine/http_guard.py), 429 with Retry-After when the
client has too many requests waiting, 503 while loading or shutting down; never a traceback.

The routes only submit calls to the service and await their results (the service's loop
thread owns the engine); a client that disconnects has its requests aborted.

>>> app = create_app(service, "smollm2", HTTPConfig(), ServerMetrics(service))  # doctest: +SKIP

engine/http_server.py serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmudf.engine import http_models as m
from llmudf.engine.metrics import CONTENT_TYPE, ServerMetrics
from llmudf.engine.params import SamplingParams
from llmudf.engine.service import EngineService, ServiceBusy, ServiceUnavailable

_log = logging.getLogger("llmudf.server")
DISCONNECT_POLL_S = 0.25
ERROR_RESPONSES = {
    code: {"model": m.ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 429, 503)
}


@dataclass(slots=True)
class HTTPConfig:
    """How the HTTP API listens and what it allows (see ServerConfig for the meaning)."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    read_timeout: float = 30.0  # a stalled request body, or request headers, in seconds
    keep_alive_timeout: int = 5
    max_connections: int = 1024
    max_waiting_per_client: int = 512
    backlog: int = 2048


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


PATHS = (
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/openapi.json",
)


def create_app(
    service: EngineService, model_id: str, config: HTTPConfig, metrics: ServerMetrics
) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over `service`."""
    app = FastAPI(
        title="llmudf engine server",
        version="1",
        docs_url=None,  # no pages that load scripts from a CDN
        redoc_url=None,
    )
    answer = _Answerer(service, model_id, config)

    @app.get("/health", response_model=m.Health, responses={503: {"model": m.Health}})
    async def health():
        alive = service.is_alive
        body = {"status": "ok" if alive else "dead", "error": service.load_error}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/ready", response_model=m.Ready, responses={503: {"model": m.Ready}})
    async def ready():
        is_ready = service.is_ready
        return JSONResponse({"ready": is_ready, "model": model_id}, 200 if is_ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=m.ModelList, responses=ERROR_RESPONSES)
    async def models():
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "llmudf"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions", response_model=m.Completion, responses=_STREAMING)
    async def completions(body: m.CompletionRequest, request: Request):
        return await answer(request, body, body.prompts, chat=False)

    @app.post("/v1/chat/completions", response_model=m.ChatCompletion, responses=_STREAMING)
    async def chat_completions(body: m.ChatCompletionRequest, request: Request):
        chat = [{"role": msg.role, "content": msg.text} for msg in body.messages]
        return await answer(request, body, [chat], chat=True)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc.status, str(exc), exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            error = first.get("ctx", {}).get("error", "")
            return _error(400, f"request body is not valid JSON: {error}")
        # after "body", without the union member tags ("str", "list[constrained-str]")
        loc = [str(p) for p in first.get("loc", ())[1:] if str(p) not in _TYPE_TAGS]
        loc = [p for p in loc if "[" not in p and "-" not in p]
        message = f"{'.'.join(loc) or 'request body'}: {first.get('msg')}"
        return _error(400, message, loc[0] if loc else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        _log.exception("unexpected error answering an HTTP request", exc_info=exc)
        return _error(500, "internal server error; the server log has the details")

    return app


_STREAMING = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or events if streaming"},
}


class _Answerer:
    """Runs one completion request: submit, await the results, answer JSON or events."""

    def __init__(self, service: EngineService, model_id: str, config: HTTPConfig):
        self.service = service
        self.model_id = model_id
        self.config = config

    async def __call__(self, request: Request, body, prompts: list, chat: bool):
        if body.model is not None and body.model != self.model_id:
            raise APIError(
                404,
                f"model {body.model!r} not found; this server serves {self.model_id!r}",
                "model",
            )
        max_prompts = min(m.MAX_PROMPTS, self.config.max_waiting_per_client)
        if len(prompts) > max_prompts:
            raise APIError(400, f"at most {max_prompts} prompts per request", "prompt")
        params = self._params(body)
        if body.stream and len(prompts) != 1:
            raise APIError(400, "streaming takes a single prompt", "prompt")
        peer = request.client.host if request.client else "unknown"
        client_id = f"http:{body.user or peer}"
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        request.state.client_id, request.state.request_id = client_id, request_id
        results = _AsyncResults()
        try:
            call = self.service.submit(
                client_id,
                prompts,
                params,
                stream=body.stream,
                max_waiting=self.config.max_waiting_per_client,
                notify=results.notify,
            )
        except ServiceBusy as exc:
            raise APIError(429, str(exc), None, {"Retry-After": str(exc.retry_after)}) from None
        except ServiceUnavailable as exc:
            raise APIError(503, str(exc), None, {"Retry-After": "5"}) from None
        results.call = call
        base = {"id": request_id, "created": int(time.time()), "model": self.model_id}
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _events(self.service, results, base, kind, chat, include_usage, params,
                             request.state)  # fmt: skip
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answers = await self._collect(request, results, len(prompts))
        answers.sort(key=lambda r: r.index)
        failed = [r for r in answers if r.error]
        if failed:
            raise APIError(failed[0].status, failed[0].error)
        outs = [r.output for r in answers]
        usage = _usage(outs)
        request.state.usage = usage
        choices = [_choice(o, i, chat) for i, o in enumerate(outs)]
        return JSONResponse({**base, "object": kind, "choices": choices, "usage": usage})

    def _params(self, body) -> SamplingParams:
        fields = body.model_dump(include=set(_PARAM_KEYS), exclude_none=True)
        if getattr(body, "max_completion_tokens", None) is not None:
            fields["max_tokens"] = body.max_completion_tokens
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        if body.guided_choice is not None:
            fields["choices"] = body.guided_choice
        context = self.service.max_context
        if context is not None and fields.get("max_tokens", 0) > context:
            raise APIError(
                400,
                f"max_tokens={fields['max_tokens']} is more than the model's context of "
                f"{context} tokens",
                "max_tokens",
            )
        try:
            return SamplingParams(**fields)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc)) from None

    async def _collect(self, request: Request, results: _AsyncResults, num: int) -> list:
        answers = []
        try:
            while len(answers) < num:
                try:
                    answers.append(await asyncio.wait_for(results.next(), DISCONNECT_POLL_S))
                except TimeoutError:
                    if await request.is_disconnected():
                        # nginx's "client closed request"; nobody reads it, the log does
                        raise APIError(499, "the client closed the connection") from None
        except BaseException:  # gone, or the server stops: free the engine
            self.service.cancel(results.call)
            raise
        return answers


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}
_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


class _AsyncResults:
    """A call's results on the event loop: the engine thread's `notify` wakes `next()`."""

    def __init__(self):
        self.call = None
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

    def notify(self) -> None:  # on the engine's loop thread
        # RuntimeError: the event loop has closed (server stopped), nobody listens
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake.set)

    async def next(self):
        while True:
            self._wake.clear()
            try:
                return self.call.results.get_nowait()
            except queue.Empty:
                await self._wake.wait()


async def _events(service, results, base, kind, chat, include_usage, params, state):
    """The server-sent events of one streamed answer; cancels the call if the client goes."""
    obj = f"{kind}.chunk" if chat else kind
    # text cut by stop strings or mapped to a choice is only known at the end
    incremental = not params.stop and params.choices is None

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(text: str | None, finish_reason: str | None = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            if text == "":
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
        return event({**base, "object": obj, "choices": [choice]})

    finished = False
    try:
        if chat:
            yield chunk("")
        sent, token_ids = "", []
        while (result := await results.next()).token_id is not None:
            token_ids.append(result.token_id)
            text = service.tokenizer.decode(token_ids)
            # hold back a half-decoded UTF-8 character
            if incremental and not text.endswith("\ufffd") and len(text) > len(sent):
                yield chunk(text[len(sent) :])
                sent = text
        finished = True
        if result.error:
            error_type = "invalid_request_error" if result.status < 500 else "server_error"
            error = {"message": result.error, "type": error_type, "code": str(result.status)}
            yield event({"error": error})
        else:
            out = result.output
            rest = out.text[len(sent) :] if out.text.startswith(sent) else out.text
            if rest:
                yield chunk(rest)
            yield chunk(None, _finish_reason(out))
            state.usage = _usage([out])
            if include_usage:
                yield event({**base, "object": obj, "choices": [], "usage": state.usage})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the server stops): free its engine slot
            service.cancel(results.call)


def _error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 429: "rate_limited", 503: "unavailable"}.get(status, str(status))
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status, headers=headers)


def _finish_reason(out) -> str:
    reason = str(getattr(out.finish_reason, "value", out.finish_reason))
    return "length" if reason == "length" else "stop"


def _choice(out, index: int, chat: bool) -> dict:
    if chat:
        body = {"message": {"role": "assistant", "content": out.text}}
    else:
        body = {"text": out.text, "logprobs": None}
    return {"index": index, **body, "finish_reason": _finish_reason(out)}


def _usage(outs: list) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outs)
    generated = sum(o.num_generated_tokens for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
    }
