"""What stands between the network and the HTTP routes: one ASGI middleware and a protocol.

`Guard` (outermost middleware), in order: rejects cross-origin browser requests (an `Origin`
that is not this server: 403, so a web page the user opens cannot drive the server), checks
the API key (`Authorization: Bearer <key>`; 401 on every path but /health), reads POST bodies
as JSON (another Content-Type: 415), refuses bodies over `max_body_bytes` by their
Content-Length (413) and while they stream in, and gives up on a body that stalls for
`read_timeout` seconds (408). It also counts each request in the metrics and writes one JSON
log line per request.

`GuardedH11Protocol` closes a connection whose request headers do not arrive within
`header_timeout` seconds (uvicorn's own timeouts cover only idle keep-alive connections).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

_log = logging.getLogger("llmudf.server")
OPEN_PATHS = ("/health",)
_JSON_TYPE = (
    b"content-type",
    b"application/json",
)  # answered without the API key (load balancers, liveness probes)


@dataclass(slots=True)
class GuardConfig:
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    read_timeout: float = 30.0


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class Guard:
    """ASGI middleware in front of the FastAPI app; `metrics` is a ServerMetrics or None."""

    def __init__(self, app, config: GuardConfig, metrics=None):
        self.app = app
        self.config = config
        self.metrics = metrics
        self._expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = [0]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            self._check(scope)
            if scope["method"] == "POST":
                receive = _replay(await self._read_body(scope, receive), receive)
                if not any(name == b"content-type" for name, _ in scope["headers"]):
                    scope = {**scope, "headers": [*scope["headers"], _JSON_TYPE]}
        except _Reject as exc:
            status[0] = exc.status
            await _send_error(send, exc)
            self._record(scope, status[0], time.monotonic() - start)
            return
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self._record(scope, status[0], time.monotonic() - start)

    def _check(self, scope) -> None:
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is not None and not _same_origin(origin, headers.get(b"host", b"")):
            raise _Reject(403, "cross-origin requests are not allowed", "forbidden_origin")
        if self._expected is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                raise _Reject(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "invalid_api_key",
                    {"www-authenticate": "Bearer"},
                )
        if scope["method"] == "POST" and b"content-type" in headers:
            # JSON or none: the types a web page may POST without a preflight are refused
            media_type = headers[b"content-type"].split(b";")[0].strip().lower()
            if media_type != b"application/json":
                raise _Reject(
                    415, "the request body must be JSON (Content-Type: application/json)", "415"
                )

    async def _read_body(self, scope, receive) -> bytes:
        """The whole request body, read here so that its size and pace are bounded."""
        limit, timeout = self.config.max_body_bytes, self.config.read_timeout
        _check_content_length(scope, limit)
        chunks, num_read = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise _Reject(
                    408, f"the request body stalled for {timeout:g} s", "request_timeout"
                ) from None
            if message["type"] == "http.disconnect":
                raise _Reject(400, "the client closed the connection mid-body", "disconnected")
            chunks.append(message.get("body", b""))
            num_read += len(chunks[-1])
            if num_read > limit:
                raise _Reject(413, f"request body is over {limit} bytes", "request_too_large")
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _record(self, scope, status: int, seconds: float) -> None:
        state = scope.get("state") or {}
        usage = state.get("usage") or {}
        if self.metrics is not None:
            self.metrics.observe_http(scope["path"], status, seconds)
        _log.info(
            json.dumps(
                {
                    "event": "http_request",
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "client": state.get("client_id") or _peer(scope),
                    "request_id": state.get("request_id"),
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                    "seconds": round(seconds, 4),
                }
            )
        )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers stall."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self.loop.call_later(self.header_timeout, self._close_if_no_request, self.cycle)

    def _close_if_no_request(self, cycle) -> None:
        # still the same request cycle (or none): the next request's headers never completed
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()


# ---- private ---------------------------------------------------------------------------------


def _check_content_length(scope, limit: int) -> None:
    for name, value in scope["headers"]:
        # h11 has answered a malformed Content-Length with 400 already
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _Reject(
                413, f"request body of {int(value)} bytes is over {limit}", "request_too_large"
            )


def _replay(body: bytes, receive):
    """A receive that hands the app `body`, then waits on the connection (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _same_origin(origin: bytes, host: bytes) -> bool:
    parts = urlsplit(origin.decode("latin-1"))
    return parts.scheme in ("http", "https") and parts.netloc.encode("latin-1") == host


def _peer(scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


async def _send_error(send, exc: _Reject) -> None:
    body = json.dumps(
        {"error": {"message": str(exc), "type": "invalid_request_error", "code": exc.code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    headers.append((b"connection", b"close"))  # the rest of the body may be unread
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
