"""The Arrow Flight client of the engine server.

`FlightEngineClient.generate` answers like `Engine.generate` (prompts: chats or templated
text, see engine/prompts.py), so callers do not care whether the engine runs in-process or
behind a server. Without an explicit location it uses the node's server for its model
(engine/node.py: one per node / GPU, started on first use). If that server dies mid-call, the
client asks for a new one and re-sends only the unanswered prompts (greedy answers make that
idempotent); an explicit server that dies is a clear error. A server with an API key gets
`api_key` (default `$LLMUDF_API_KEY`) on every call. Wire format: engine/wire.py.
"""

from __future__ import annotations

import os
import socket

import pyarrow.flight as flight

from llmudf.engine import wire
from llmudf.engine.node import EngineServerError, node_server
from llmudf.engine.params import Output

# the server is gone or going: start / find another and re-send what is unanswered
_SERVER_LOST = (
    flight.FlightUnavailableError,
    flight.FlightInternalError,
    flight.FlightTimedOutError,
)


class FlightEngineClient:
    """Answers prompts through an engine server.

    location: "grpc://host:port" or "grpc+unix:///path"; None = this node's server for
    `model`, started on first use (`engine` = extra EngineConfig fields for it). `api_key`:
    the server's key (None = `$LLMUDF_API_KEY`, if set).

    >>> client = FlightEngineClient(model=None)                           # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "Capital of France?"}]
    >>> outs = client.generate([chat], params)                            # doctest: +SKIP
    >>> outs[0].text                                                      # doctest: +SKIP
    'Paris'
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        model: str | None = None,
        engine: dict | None = None,
        client_id: str | None = None,
        max_restarts: int = 2,
        start_timeout: float = 600.0,
        api_key: str | None = None,
    ):
        self.model = model
        self.engine = dict(engine or {})
        self.client_id = client_id or f"{socket.gethostname()}:{os.getpid()}"
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.is_managed = location is None
        self._options = wire.call_options(api_key or wire.api_key_from_env())
        self.location = (
            location or node_server(model, self.engine, timeout=start_timeout)["location"]
        )
        self._conn: flight.FlightClient | None = None

    def generate(self, prompts: list, params, progress=None, on_output=None) -> list[Output]:
        """One Output per prompt (a chat of one user message after an optional system one, or
        templated str), in prompt order. `progress(1)` is called per answer and
        `on_output(index, output)` before it, as answers arrive."""
        outputs: dict[int, Output] = {}

        def on_row(row: dict) -> None:
            out = outputs[row["id"]] = _output(row)
            if on_output is not None:
                on_output(row["id"], out)
            if progress is not None:
                progress(1)

        self._answer(prompts, params, on_row)
        return [outputs[i] for i in range(len(prompts))]

    def generate_rows(self, prompts: list, params, progress=None) -> list[dict]:
        """`generate` as plain dicts (the Output fields, `id` = prompt index). `params`:
        SamplingParams or a dict of its fields."""
        on_row = None if progress is None else lambda _row: progress(1)
        return self._answer(prompts, params, on_row)

    def action(self, name: str) -> dict:
        """Run a server action (health, ready, stats) and return its JSON body."""
        try:
            action = flight.Action(name, b"")
            return wire.decode_action(self._client().do_action(action, self._options))
        except flight.FlightUnauthenticatedError as exc:
            raise _auth_error(self.location, exc) from None
        except _SERVER_LOST as exc:
            self._close()
            raise EngineServerError(
                f"engine server at {self.location} is not answering: {exc}"
            ) from exc

    def close(self) -> None:
        self._close()

    # ---- private -------------------------------------------------------------------------

    def _answer(self, prompts: list, params, on_row) -> list[dict]:
        answers: dict[int, dict] = {}
        for attempt in range(self.max_restarts + 1):
            todo = [(i, p) for i, p in enumerate(prompts) if i not in answers]
            if not todo:
                break
            try:
                self._exchange(todo, params, answers, on_row)
                break
            except flight.FlightUnauthenticatedError as exc:
                raise _auth_error(self.location, exc) from None
            except _SERVER_LOST as exc:
                self._close()
                if not self.is_managed:
                    raise EngineServerError(
                        f"engine server at {self.location} is not answering ({exc}); "
                        "is it running? start one with `llmudf serve`"
                    ) from exc
                if attempt == self.max_restarts:
                    raise EngineServerError(
                        f"engine server at {self.location} died {attempt + 1} times during one "
                        f"call; last error: {exc}"
                    ) from exc
                self.location = node_server(self.model, self.engine, timeout=self.start_timeout)[
                    "location"
                ]
        return [answers[i] for i in range(len(prompts))]

    def _client(self) -> flight.FlightClient:
        if self._conn is None:
            self._conn = flight.FlightClient(self.location)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, todo: list, params, answers: dict, on_row) -> None:
        command = wire.encode_command(self.client_id, params)
        descriptor = flight.FlightDescriptor.for_command(command)
        writer, reader = self._client().do_exchange(descriptor, self._options)
        with writer:
            writer.begin(wire.REQUEST_SCHEMA)
            writer.write_table(wire.encode_requests(todo))
            writer.done_writing()
            errors = []
            for chunk in reader:
                for row in chunk.data.to_pylist():
                    error = row.pop("error")
                    if error is not None:
                        errors.append(f"prompt {row['id']}: {error}")
                        continue
                    answers[row["id"]] = row
                    if on_row is not None:
                        on_row(row)
        if errors:
            raise ValueError(f"{len(errors)} prompt(s) failed on the engine server; {errors[0]}")


# ---- private ---------------------------------------------------------------------------------


def _auth_error(location: str, exc: Exception) -> EngineServerError:
    return EngineServerError(
        f"engine server at {location} refused the API key ({exc}); pass api_key= or set "
        f"${wire.API_KEY_ENV} to the key the server was started with"
    )


def _output(row: dict) -> Output:
    fields = {k: v for k, v in row.items() if k != "id"}
    return Output(request_id=str(row["id"]), **fields)
