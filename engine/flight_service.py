"""The Arrow Flight servicer: `DoExchange` and the actions in front of an EngineService.

Handlers run on Flight's threads and only `submit` / `cancel` calls and read their results;
the service's loop thread stays the single owner of the engine. A client that goes away
mid-exchange (closed, killed) has its requests aborted in the engine. Errors reach the
client as a message; tracebacks go to the server log. With an API key every call needs
`authorization: Bearer <key>`. Wire format: engine/wire.py.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import queue
import time

import pyarrow as pa
import pyarrow.flight as flight

from llmudf.engine import wire
from llmudf.engine.service import EngineService, ServiceUnavailable

MAX_ROWS_PER_ANSWER_BATCH = 256
CANCEL_POLL_S = 0.1  # how often a waiting exchange checks that its client is still there
_log = logging.getLogger("llmudf.server")


class FlightEngineServer(flight.FlightServerBase):
    """Streams each exchange's requests into the service and its answers back as they finish."""

    def __init__(
        self, service: EngineService, location: str, model_id: str, api_key: str | None = None
    ):
        middleware = {"auth": _BearerAuth(api_key)} if api_key else None
        super().__init__(location, middleware=middleware)
        self.service = service
        self.model_id = model_id

    def do_exchange(self, context, descriptor, reader, writer):
        with _no_traceback("exchange"):
            self._exchange(context, descriptor, reader, writer)

    def do_action(self, context, action):
        with _no_traceback(f"action {action.type!r}"):
            body = self._action(action.type)
        yield flight.Result(json.dumps(body).encode())

    def list_actions(self, context):
        return list(wire.ACTIONS.items())

    # ---- private -------------------------------------------------------------------------

    def _exchange(self, context, descriptor, reader, writer):
        start = time.monotonic()
        try:
            client_id, params = wire.decode_command(descriptor.command)
            ids, prompts = wire.read_requests(reader)
        except pa.ArrowInvalid as exc:
            raise flight.FlightServerError(str(exc)) from None
        try:
            call = self.service.submit(client_id, prompts, params)
        except ServiceUnavailable as exc:
            raise flight.FlightUnavailableError(str(exc)) from None
        writer.begin(wire.ANSWER_SCHEMA)
        num_left, num_errors = len(prompts), 0
        try:
            while num_left:
                results = [self._next_answer(call, context)]
                while len(results) < MAX_ROWS_PER_ANSWER_BATCH:
                    try:
                        results.append(call.results.get_nowait())
                    except queue.Empty:
                        break
                num_left -= len(results)
                num_errors += sum(r.error is not None for r in results)
                writer.write_batch(wire.encode_answers(results, ids))
        except BaseException:
            self.service.cancel(call)  # the client went away: free its engine slots
            _log_exchange(client_id, len(prompts), num_left, num_errors, start, "cancelled")
            raise
        _log_exchange(client_id, len(prompts), 0, num_errors, start, "ok")

    def _action(self, name: str) -> dict:
        if name == "health":
            body = {"alive": self.service.is_alive, "error": self.service.load_error}
        elif name == "ready":
            body = {"ready": self.service.is_ready, "model": self.model_id}
        elif name == "stats":
            body = {
                "num_waiting": self.service.num_waiting,
                "num_running": self.service.num_running,
                "num_served": self.service.num_served,
                "pid": os.getpid(),
                "engine": self.service.engine_stats(),
            }
        else:
            raise flight.FlightServerError(
                f"unknown action {name!r}; known: {', '.join(wire.ACTIONS)}"
            )
        return body

    def _next_answer(self, call, context):
        while True:
            try:
                return call.next_answer(timeout=CANCEL_POLL_S)
            except queue.Empty:
                if context.is_cancelled():
                    raise _ClientGone from None


class _ClientGone(Exception):
    """The client of an exchange cancelled it or disconnected."""


@contextlib.contextmanager
def _no_traceback(what: str):
    """Flight sends a Python exception's traceback to the client; send a message instead."""
    try:
        yield
    except (flight.FlightError, _ClientGone):
        raise
    except Exception:
        _log.exception("engine server: %s failed", what)
        raise flight.FlightServerError(
            f"internal error in the engine server's {what}; its log has the details"
        ) from None


class _BearerAuth(flight.ServerMiddlewareFactory):
    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    def start_call(self, info, headers):
        given = [v.encode() if isinstance(v, str) else v for v in headers.get("authorization", [])]
        if not any(hmac.compare_digest(v, self._expected) for v in given):
            raise flight.FlightUnauthenticatedError(
                f"missing or wrong API key: send 'authorization: Bearer <key>' "
                f"(FlightEngineClient reads ${wire.API_KEY_ENV})"
            )
        return None


def _log_exchange(client_id, num_prompts, num_left, num_errors, start, outcome) -> None:
    if not _log.isEnabledFor(logging.INFO):
        return
    _log.info(
        json.dumps(
            {
                "event": "flight_exchange",
                "client": client_id,
                "num_prompts": num_prompts,
                "num_unanswered": num_left,
                "num_errors": num_errors,
                "outcome": outcome,
                "seconds": round(time.monotonic() - start, 4),
            }
        )
    )
