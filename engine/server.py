"""The engine server process: one engine per node / GPU behind Arrow Flight and HTTP.

Many processes on a machine (Spark tasks, DuckDB sessions, notebooks) share one model and
one prefix cache through it. `EngineServer` starts the engine loop (engine/service.py), the
Flight servicer (engine/flight_service.py, wire format in engine/wire.py) and optionally the
OpenAI-compatible HTTP API (engine/http_api.py) together, and drains them together on
shutdown. `llmudf serve` (and `python -m llmudf.engine.server`, how engine/node.py starts a
node's server) runs it until SIGINT / SIGTERM:

    llmudf serve --model path/to/model.gguf --port 8815 --http-port 8000 --api-key KEY

With an API key (`--api-key` or `$LLMUDF_API_KEY`) every Flight call and every HTTP request
but /health needs it. Binding an address other than loopback without a key is refused
unless `--insecure`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmudf.engine.flight_service import FlightEngineServer
from llmudf.engine.node import remove_own_state, write_state
from llmudf.engine.service import EngineService
from llmudf.engine.wire import API_KEY_ENV


@dataclass(slots=True)
class ServerConfig:
    """How to run the engine server.

    Listen on a unix `socket` path or on 127.0.0.1:`port` (0 = any free port); `http_port`
    also serves OpenAI-compatible HTTP (None = off). `engine` holds extra EngineConfig
    fields. `max_in_engine` caps the requests inside the engine (None = its max_num_seqs),
    so fair admission decides who goes next. `state_file`, if set, receives
    `{"pid", "location", "http_port", "model"}` once the server listens.

    `api_key`: required on Flight and HTTP (None = none). A `host` other than loopback needs
    one, or `insecure=True` (then a warning). HTTP limits: `max_body_bytes` per request,
    `read_timeout` seconds for a stalled body, `max_waiting_per_client` queued requests per
    client (more: 429 with Retry-After), `max_connections` open at once (more: 503);
    `max_tokens` is capped by the model's context.

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
    api_key: str | None = None
    insecure: bool = False
    max_body_bytes: int = 8 << 20
    read_timeout: float = 30.0
    max_waiting_per_client: int = 512
    max_connections: int = 1024

    def __post_init__(self):
        if (self.socket is None) == (self.port is None):
            raise ValueError("give exactly one of socket (a unix socket path) or port")
        if self.port is not None and not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_in_engine is not None and self.max_in_engine < 1:
            raise ValueError(f"max_in_engine must be >= 1, got {self.max_in_engine}")
        for name in ("max_body_bytes", "max_waiting_per_client", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.read_timeout > 0:
            raise ValueError(f"read_timeout must be > 0, got {self.read_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        if not is_loopback(self.host) and self.api_key is None:
            if not self.insecure:
                raise ValueError(
                    f"refusing to serve on {self.host} without an API key: anyone who can "
                    f"reach it could use it; give --api-key (or ${API_KEY_ENV}), or "
                    "--insecure if the network is trusted"
                )
            warnings.warn(
                f"serving on {self.host} without an API key (--insecure): anyone who can "
                "reach this address can use the server",
                stacklevel=2,
            )

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
        config = self.config
        self.flight = FlightEngineServer(
            self.service, config.location, self.model_id, config.api_key
        )
        self.location = config.location
        if config.port == 0:
            self.location = f"grpc://{config.host}:{self.flight.port}"
        if config.http_port is not None:
            from llmudf.engine.http_api import HTTPConfig
            from llmudf.engine.http_server import HTTPServer

            http_config = HTTPConfig(
                host=config.host,
                port=config.http_port,
                api_key=config.api_key,
                max_body_bytes=config.max_body_bytes,
                read_timeout=config.read_timeout,
                max_waiting_per_client=config.max_waiting_per_client,
                max_connections=config.max_connections,
            )
            self.http = HTTPServer(self.service, self.model_id, http_config).start()
            self.http_port = self.http.port
        if self.config.state_file:
            write_state(Path(self.config.state_file), self.location, self.http_port, self.model_id)
        return self

    def shutdown(self) -> None:
        """Refuse new work (503 / Flight unavailable), finish (or answer with an error)
        in-flight work, then stop listening."""
        self.service.shutdown(self.config.drain_timeout)
        if self.http is not None:
            self.http.stop()
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
    parser.add_argument(
        "--api-key", default=None, help=f"required from clients (default ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without a key"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=8 << 20, help="HTTP request body limit"
    )
    parser.add_argument(
        "--read-timeout", type=float, default=30.0, help="seconds a request body may stall"
    )
    parser.add_argument(
        "--max-waiting-per-client", type=int, default=512, help="queued requests (then 429)"
    )
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="open HTTP connections (then 503)"
    )
    return parser


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until SIGINT / SIGTERM, then shut down gracefully."""
    port = args.port if args.port is not None or args.socket else 8815
    engine = json.loads(args.engine_json)
    if not isinstance(engine, dict):
        raise SystemExit(f"--engine-json must be a JSON object, got {args.engine_json!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = _server_config(args, port, engine)
    except ValueError as exc:
        raise SystemExit(f"llmudf serve: {exc}") from None
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


def _server_config(args: argparse.Namespace, port: int, engine: dict) -> ServerConfig:
    return ServerConfig(
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
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        insecure=args.insecure,
        max_body_bytes=args.max_body_bytes,
        read_timeout=args.read_timeout,
        max_waiting_per_client=args.max_waiting_per_client,
        max_connections=args.max_connections,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


if __name__ == "__main__":
    raise SystemExit(serve_main(add_serve_arguments(argparse.ArgumentParser()).parse_args()))
