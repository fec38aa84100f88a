"""The Arrow Flight client of the engine server, and how a process finds its node's server.

`FlightEngineClient` implements the EngineClient interface (`generate`, `model_id`), so
callers do not care whether the engine runs in-process or behind a server. Without an
explicit location it uses the node's server for its model: one per node / GPU, found through
a state file under `llmudf.paths.cache_dir()/servers/` and started on first use under a file
lock, so the executors of a node share one model and one prefix cache. If that server dies
mid-call, the client starts a new one and re-sends only the unanswered prompts (greedy
answers make that idempotent); an explicit server that dies is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
from filelock import FileLock

from llmudf import paths
from llmudf.engine.server import REQUEST_SCHEMA
from llmudf.prompt import ChatPrompt

# the server is gone or going: start / find another and re-send what is unanswered
_SERVER_LOST = (
    flight.FlightUnavailableError,
    flight.FlightInternalError,
    flight.FlightTimedOutError,
)


class EngineServerError(RuntimeError):
    """The engine server cannot be reached, could not start, or died and could not be replaced."""


class FlightEngineClient:
    """Answers prompts through an engine server.

    location: "grpc://host:port" or "grpc+unix:///path"; None = this node's server for
    `model`, started on first use (`engine` = extra EngineConfig fields for it).

    >>> client = FlightEngineClient(model=None)                           # doctest: +SKIP
    >>> outs = client.generate([ChatPrompt("Capital of France?")], params)  # doctest: +SKIP
    >>> outs[0].text                                                        # doctest: +SKIP
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
    ):
        self.model = model
        self.engine = dict(engine or {})
        self.client_id = client_id or f"{socket.gethostname()}:{os.getpid()}"
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.is_managed = location is None
        self.location = (
            location or node_server(model, self.engine, timeout=start_timeout)["location"]
        )
        self._conn: flight.FlightClient | None = None

    @property
    def model_id(self) -> str:
        return paths.weights_id(self.model)

    def generate(self, prompts: list, params, progress=None) -> list:
        """One Output per prompt (ChatPrompt or templated str), in prompt order."""
        from llmudf.engine.request import Output

        rows = self.generate_rows(prompts, params, progress)
        return [Output(request_id=str(r.pop("id")), **r) for r in rows]

    def generate_rows(self, prompts: list, params, progress=None) -> list[dict]:
        """`generate` as plain dicts (the Output fields, `id` = prompt index): for callers
        that must not import torch, such as Spark tasks. `params`: SamplingParams or a dict
        of its fields."""
        answers: dict[int, dict] = {}
        for attempt in range(self.max_restarts + 1):
            todo = [(i, p) for i, p in enumerate(prompts) if i not in answers]
            if not todo:
                break
            try:
                self._exchange(todo, params, answers, progress)
                break
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

    def action(self, name: str) -> dict:
        """Run a server action (health, ready, stats) and return its JSON body."""
        try:
            results = list(self._client().do_action(flight.Action(name, b"")))
        except _SERVER_LOST as exc:
            self._close()
            raise EngineServerError(
                f"engine server at {self.location} is not answering: {exc}"
            ) from exc
        return json.loads(results[0].body.to_pybytes())

    def close(self) -> None:
        self._close()

    # ---- private -------------------------------------------------------------------------

    def _client(self) -> flight.FlightClient:
        if self._conn is None:
            self._conn = flight.FlightClient(self.location)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, todo: list, params, answers: dict, progress) -> None:
        command = {"client_id": self.client_id, "params": _params_dict(params)}
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        writer, reader = self._client().do_exchange(descriptor)
        with writer:
            writer.begin(REQUEST_SCHEMA)
            writer.write_table(_request_table(todo))
            writer.done_writing()
            errors = []
            for chunk in reader:
                for row in chunk.data.to_pylist():
                    error = row.pop("error")
                    if error is not None:
                        errors.append(f"prompt {row['id']}: {error}")
                        continue
                    answers[row["id"]] = row
                    if progress is not None:
                        progress(1)
        if errors:
            raise ValueError(f"{len(errors)} prompt(s) failed on the engine server; {errors[0]}")


def node_server(
    model: str | None = None, engine: dict | None = None, *, timeout: float = 600.0
) -> dict:
    """This node's engine server for `model` (started if none is alive): its state dict
    `{"pid", "location", "http_port", "model"}`.

    >>> node_server()["location"]                                 # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    """
    engine = dict(engine or {})
    state_path = _servers_dir() / f"{_server_key(model, engine)}.json"
    with FileLock(str(state_path.with_suffix(".lock")), timeout=timeout):
        state = _read_state(state_path)
        if state is not None and _is_serving(state["location"]):
            return state
        return _start_server(model, engine, state_path, timeout)


# ---- private ---------------------------------------------------------------------------------


def _servers_dir() -> Path:
    path = paths.cache_dir() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _server_key(model: str | None, engine: dict) -> str:
    # one server per (model, engine settings, visible GPUs) on a node
    model_key = str(Path(model).resolve()) if model and os.path.exists(model) else model
    blob = json.dumps(
        [model_key, engine, os.environ.get("CUDA_VISIBLE_DEVICES")], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_serving(location: str, timeout: float = 5.0) -> bool:
    options = flight.FlightCallOptions(timeout=timeout)
    try:
        with flight.FlightClient(location) as conn:
            body = list(conn.do_action(flight.Action("ready", b""), options))[0].body
            return bool(json.loads(body.to_pybytes())["ready"])
    except (flight.FlightError, pa.ArrowException, OSError, ValueError):
        return False


def _start_server(model: str | None, engine: dict, state_path: Path, timeout: float) -> dict:
    state_path.unlink(missing_ok=True)
    log_path = state_path.with_suffix(".log")
    cmd = [sys.executable, "-m", "llmudf.engine.server", "--port", "0"]
    cmd += ["--state-file", str(state_path), "--engine-json", json.dumps(engine)]
    cmd += ["--idle-timeout", os.environ.get("LLMUDF_SERVER_IDLE_TIMEOUT", "900")]
    if model:
        cmd += ["--model", model]
    with open(log_path, "ab") as log:
        # own session: the server outlives the task that started it and is shared by the node
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineServerError(
                f"engine server exited with code {proc.returncode} while starting; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        state = _read_state(state_path)
        if state is not None and state.get("pid") == proc.pid and _is_serving(state["location"]):
            return state
        time.sleep(0.1)
    proc.kill()
    raise EngineServerError(f"engine server did not become ready in {timeout:.0f}s; log {log_path}")


def _tail(path: Path, num_chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-num_chars:]


def _params_dict(params) -> dict:
    fields = params if isinstance(params, dict) else asdict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _request_table(todo: list) -> pa.Table:
    users, systems, texts = [], [], []
    for i, prompt in todo:
        if isinstance(prompt, ChatPrompt):
            users.append(prompt.user)
            systems.append(prompt.system)
            texts.append(None)
        elif isinstance(prompt, str):
            users.append(None)
            systems.append(None)
            texts.append(prompt)
        else:
            raise TypeError(
                f"prompt {i} is a {type(prompt).__name__}; "
                "the engine server takes a ChatPrompt or a str"
            )
    ids = [i for i, _ in todo]
    return pa.table(
        {"id": ids, "user": users, "system": systems, "prompt": texts}, schema=REQUEST_SCHEMA
    )
