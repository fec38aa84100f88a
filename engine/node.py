"""The node-local engine server: one per (model, engine settings, visible GPUs) on a machine.

A server that llmudf starts itself announces where it listens in a state file,
`servers_dir()/<key>.json` = `{"pid", "location", "http_port", "model"}`. `node_server`
finds that server (alive and ready) or starts a new one, under a file lock so the processes
of a node (Spark executors, notebooks) share one model and one prefix cache; a client whose
server died calls it again to get a replacement. The server runs in its own session, outlives
the process that started it and exits after `$LLMUDF_SERVER_IDLE_TIMEOUT` idle seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
from filelock import FileLock

from llmudf.engine import wire
from llmudf.engine.paths import servers_dir


class EngineServerError(RuntimeError):
    """The engine server cannot be reached, could not start, or died and could not be replaced."""


def node_server(
    model: str | None = None, engine: dict | None = None, *, timeout: float = 600.0
) -> dict:
    """This node's engine server for `model` (started if none is alive): its state dict
    `{"pid", "location", "http_port", "model"}`.

    >>> node_server()["location"]                                 # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    """
    engine = dict(engine or {})
    state_path = servers_dir() / f"{_server_key(model, engine)}.json"
    with FileLock(str(state_path.with_suffix(".lock")), timeout=timeout):
        state = _read_state(state_path)
        if state is not None and _is_serving(state["location"]):
            return state
        return _start_server(model, engine, state_path, timeout)


def write_state(path: Path, location: str, http_port: int | None, model_id: str) -> None:
    """Announce this process's server at `path` (what `node_server` reads)."""
    state = {"pid": os.getpid(), "location": location, "http_port": http_port, "model": model_id}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # readers never see a half-written file


def remove_own_state(path: Path) -> None:
    """Remove the state file at `path` if this process wrote it (a replacement may own it)."""
    state = _read_state(path)
    if state is not None and state.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


# ---- private ---------------------------------------------------------------------------------


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
    options = wire.call_options(wire.api_key_from_env(), timeout=timeout)
    try:
        with flight.FlightClient(location) as conn:
            body = wire.decode_action(conn.do_action(flight.Action("ready", b""), options))
            return bool(body["ready"])
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
