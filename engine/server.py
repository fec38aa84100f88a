"""The engine server process: one engine per node / GPU behind Arrow Flight and HTTP.

Many processes on a machine (Spark tasks, DuckDB sessions, notebooks) share one model and
one prefix cache through it. `EngineServer` starts the engine loop (engine/service.py), the
Flight servicer (engine/flight_service.py, wire format in engine/wire.py) and optionally the
OpenAI-compatible HTTP API (engine/http_api.py) together, and drains them together on
shutdown. `llmudf serve` (and `python -m llmudf.engine.server`, how engine/node.py starts a
node's server) runs it until SIGINT / SIGTERM:

    llmudf serve --model path/to/model.gguf --port 8815 --http-port 8000
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from llmudf.engine.flight_service import FlightEngineServer
from llmudf.engine.node import remove_own_state, write_state
from llmudf.engine.service import EngineService


@dataclass(slots=True)
class ServerConfig:
    """How to run the engine server.

    Listen on a unix `socket` path or on 127.0.0.1:`port` (0 = any free port); `http_port`
    also serves OpenAI-compatible HTTP (None = off). `engine` holds extra EngineConfig
    fields. `max_in_engine` caps the requests inside the engine (None = its max_num_seqs),
    so fair admission decides who goes next. `state_file`, if set, receives
    `{"pid", "location", "http_port", "model"}` once the server listens.

    >>> ServerConfig(port=0).location
    'grpc://127.0.0.1:0'
    """

    model: str | None = None
    socket: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    http_port: int | None = None
    engine: dict | None = None
    max_in_engine: int | None = None
    fair: bool = True
    drain_timeout: float = 30.0
    idle_timeout: float | None = None  # exit after this many idle seconds (auto-started servers)
    state_file: str | None = None

    def __post_init__(self):
        if (self.socket is None) == (self.port is None):
            raise ValueError("give exactly one of socket (a unix socket path) or port")
        if self.port is not None and not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_in_engine is not None and self.max_in_engine < 1:
            raise ValueError(f"max_in_engine must be >= 1, got {self.max_in_engine}")

    @property
    def location(self) -> str:
        if self.socket is not None:
            return f"grpc+unix://{self.socket}"
        return f"grpc://{self.host}:{self.port}"


class EngineServer:
    """The engine loop, the Flight service and (optionally) HTTP, started and stopped together.

    >>> server = EngineServer(ServerConfig(port=0)).start()       # doctest: +SKIP
    >>> server.location                                           # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    >>> server.shutdown()                                         # doctest: +SKIP
    """

    def __init__(self, config: ServerConfig, engine_factory=None):
        self.config = config
        self.model_id = config.model or "smollm2"
        self.service = EngineService(
            engine_factory or self._default_factory,
            max_in_engine=config.max_in_engine,
            fair=config.fair,
        )
        self.flight: FlightEngineServer | None = None
        self.http = None
        self.location: str | None = None
        self.http_port: int | None = None

    def start(self) -> EngineServer:
        """Start listening at once; the model loads in the background (see `ready`)."""
        self.service.start()
        self.flight = FlightEngineServer(self.service, self.config.location, self.model_id)
        self.location = self.config.location
        if self.config.port == 0:
            self.location = f"grpc://{self.config.host}:{self.flight.port}"
        if self.config.http_port is not None:
            from llmudf.engine.http_api import start_http_server

            self.http = start_http_server(
                self.service, self.model_id, self.config.host, self.config.http_port
            )
            self.http_port = self.http.server_address[1]
        if self.config.state_file:
            write_state(Path(self.config.state_file), self.location, self.http_port, self.model_id)
        return self

    def shutdown(self) -> None:
        """Finish (or answer with an error) in-flight work, then stop listening."""
        self.service.shutdown(self.config.drain_timeout)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.flight is not None:
            self.flight.shutdown()
        if self.config.state_file:
            remove_own_state(Path(self.config.state_file))

    def _default_factory(self):
        from llmudf.engine.config import EngineConfig
        from llmudf.engine.engine import Engine

        return Engine(EngineConfig(model=self.config.model, **(self.config.engine or {})))


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `llmudf serve`; `serve_main(parser.parse_args())` runs it."""
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None, help="listen on this unix socket path")
    where.add_argument("--port", type=int, default=None, help="Flight port (default 8815)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    parser.add_argument("--engine-json", default="{}", help="extra EngineConfig fields, as JSON")
    parser.add_argument("--max-in-engine", type=int, default=None, help="admission cap")
    parser.add_argument("--no-fair", action="store_true", help="FIFO instead of VTC fairness")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    parser.add_argument("--idle-timeout", type=float, default=None, help="exit when idle (s)")
    parser.add_argument("--state-file", default=None, help="write pid and address here (JSON)")
    return parser


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until SIGINT / SIGTERM, then shut down gracefully."""
    port = args.port if args.port is not None or args.socket else 8815
    engine = json.loads(args.engine_json)
    if not isinstance(engine, dict):
        raise SystemExit(f"--engine-json must be a JSON object, got {args.engine_json!r}")
    config = ServerConfig(
        model=args.model,
        socket=args.socket,
        port=port if args.socket is None else None,
        host=args.host,
        http_port=args.http_port,
        engine={"device": args.device, **engine},
        max_in_engine=args.max_in_engine,
        fair=not args.no_fair,
        drain_timeout=args.drain_timeout,
        idle_timeout=args.idle_timeout,
        state_file=args.state_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = EngineServer(config).start()
    http = f", HTTP on {config.host}:{server.http_port}" if server.http_port else ""
    print(f"llmudf engine server: Flight on {server.location}{http}; loading the model", flush=True)
    if not server.service.wait_ready(timeout=None) and server.service.load_error:
        print(f"llmudf engine server: {server.service.load_error}", flush=True)
        server.shutdown()
        return 1
    while not stop.wait(0.5):
        if config.idle_timeout is not None and server.service.idle_seconds > config.idle_timeout:
            break
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main(add_serve_arguments(argparse.ArgumentParser()).parse_args()))
