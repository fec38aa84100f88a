"""OpenAI-compatible HTTP in front of an EngineService, on the stdlib ThreadingHTTPServer.

Routes: GET /health, /ready, /v1/models; POST /v1/completions, /v1/chat/completions
(`"stream": true` answers as server-sent events). Beyond OpenAI's fields a request may set
`top_k`, `ignore_eos` and `guided_choice` (a list of strings the answer must be one of, as in vLLM).
Errors are JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx / 5xx status.

>>> server = start_http_server(service, "smollm2", "127.0.0.1", 0)   # doctest: +SKIP
>>> openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
...               api_key="none").models.list().data[0].id          # doctest: +SKIP
'smollm2'
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llmudf.engine.params import SamplingParams
from llmudf.engine.service import EngineService, ServiceUnavailable

MAX_BODY_BYTES = 8 << 20
_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def start_http_server(
    service: EngineService, model_id: str, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """Serve `service` over HTTP on a background thread; `server.shutdown()` stops it."""
    handler = type("Handler", (_Handler,), {"service": service, "model_id": model_id})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="llmudf-http", daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    service: EngineService
    model_id: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep the server's stdout for real messages
        pass

    def do_GET(self):
        self._dispatch({"/health": self._health, "/ready": self._ready, "/v1/models": self._models})

    def do_POST(self):
        self._dispatch({"/v1/completions": self._completions, "/v1/chat/completions": self._chat})

    # ---- routes --------------------------------------------------------------------------

    def _health(self):
        alive = self.service.is_alive
        body = {"status": "ok" if alive else "dead", "error": self.service.load_error}
        self._send_json(200 if alive else 503, body)

    def _ready(self):
        ready = self.service.is_ready
        self._send_json(200 if ready else 503, {"ready": ready, "model": self.model_id})

    def _models(self):
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "llmudf"}
        self._send_json(200, {"object": "list", "data": [card]})

    def _completions(self):
        body = self._read_body()
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise HTTPError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        self._answer(body, prompts, "text_completion", chat=False)

    def _chat(self):
        body = self._read_body()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "messages must be a non-empty list", "messages")
        self._answer(body, [self._chat_prompt(messages)], "chat.completion", chat=True)

    # ---- helpers -------------------------------------------------------------------------

    def _dispatch(self, routes):
        route = routes.get(self.path.split("?", 1)[0])
        try:
            if route is None:
                raise HTTPError(404, f"no route {self.command} {self.path}")
            route()
        except HTTPError as exc:
            self._send_error(exc.status, str(exc), exc.param)
        except ServiceUnavailable as exc:
            self._send_error(503, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body of {length} bytes is over {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise HTTPError(
                404, f"model {model!r} not found; this server serves {self.model_id!r}", "model"
            )
        if body.get("n", 1) != 1:
            raise HTTPError(400, "only n=1 is supported", "n")
        return body

    def _chat_prompt(self, messages: list) -> list[dict]:
        """The engine's chat (engine/prompts.py): role and plain-text content per message."""
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise HTTPError(
                    400, f"messages[{i}] needs a role of system, user or assistant", "messages"
                )
            chat.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
        return chat

    def _params(self, body: dict) -> SamplingParams:
        kwargs = {k: body[k] for k in _PARAM_KEYS if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None:
            kwargs["max_tokens"] = body["max_completion_tokens"]
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        if body.get("guided_choice") is not None:
            kwargs["choices"] = body["guided_choice"]
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc)) from exc

    def _answer(self, body: dict, prompts: list, kind: str, chat: bool):
        params = self._params(body)
        stream = bool(body.get("stream"))
        if stream and len(prompts) != 1:
            raise HTTPError(400, "streaming takes a single prompt", "prompt")
        client_id = str(body.get("user") or f"http:{self.client_address[0]}")
        call = self.service.submit(client_id, prompts, params, stream=stream)
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": self.model_id,
        }
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            # text cut by stop strings or mapped to a choice is only known at the end
            incremental = not params.stop and params.choices is None
            return self._stream(call, base, kind, chat, include_usage, incremental)
        results = sorted((call.results.get() for _ in prompts), key=lambda r: r.index)
        errors = [r.error for r in results if r.error]
        if errors:
            raise HTTPError(400, errors[0])
        outs = [r.output for r in results]
        choices = [_choice(o, i, chat) for i, o in enumerate(outs)]
        self._send_json(200, {**base, "object": kind, "choices": choices, "usage": _usage(outs)})

    def _stream(self, call, base, kind: str, chat: bool, include_usage: bool, incremental: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = f"{kind}.chunk" if chat else kind

        def chunk(text: str | None, finish_reason: str | None = None) -> None:
            if chat:
                delta = {} if text is None else {"content": text}
                if text == "":
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
            self._send_event({**base, "object": obj, "choices": [choice]})

        if chat:
            chunk("")
        sent, token_ids = "", []
        tokenizer = self.service.tokenizer
        try:
            while (result := call.results.get()).token_id is not None:
                token_ids.append(result.token_id)
                text = tokenizer.decode(token_ids)
                # hold back a half-decoded UTF-8 character
                if incremental and not text.endswith("\ufffd") and len(text) > len(sent):
                    chunk(text[len(sent) :])
                    sent = text
        except (BrokenPipeError, ConnectionResetError):
            self.service.cancel(call)  # the client hung up: free its engine slot
            raise
        if result.error:
            self._send_event({"error": {"message": result.error, "type": "invalid_request_error"}})
        else:
            out = result.output
            rest = out.text[len(sent) :] if out.text.startswith(sent) else out.text
            if rest:
                chunk(rest)
            chunk(None, _finish_reason(out))
            if include_usage:
                self._send_event({**base, "object": obj, "choices": [], "usage": _usage([out])})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send_event(self, payload: dict):
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = {404: "not_found", 413: "request_too_large", 503: "unavailable"}.get(status)
        error = {"message": message, "type": kind, "param": param, "code": code}
        self.close_connection = True  # the request body may be unread
        self._send_json(status, {"error": error})


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise HTTPError(
        400, f"messages[{i}].content must be a string or a list of text parts", "messages"
    )


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
