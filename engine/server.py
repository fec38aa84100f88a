"""The engine server: one engine per node / GPU behind Arrow Flight and OpenAI-compatible HTTP.

Many processes on a machine (Spark tasks, DuckDB sessions, notebooks) share one model and
one prefix cache through it. Flight protocol (`DoExchange`):

- descriptor command: JSON `{"client_id": str, "params": {SamplingParams fields}}`
- the client streams request batches (`REQUEST_SCHEMA`: `id`, `user`, `system`; or `id`,
  `prompt` for already-templated text), then closes its side;
- the server streams answer batches (`ANSWER_SCHEMA`) as requests finish, in finish order.

Actions: `health`, `ready`, `stats` (JSON bodies). `llmudf serve` runs it:

    llmudf serve --model path/to/model.gguf --port 8815 --http-port 8000
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from llmudf.engine.service import EngineService, ServiceUnavailable
from llmudf.prompt import ChatPrompt

# per row exactly one of user (a chat message, with an optional system) or prompt (templated)
REQUEST_SCHEMA = pa.schema(
    [("id", pa.int64()), ("user", pa.string()), ("system", pa.string()), ("prompt", pa.string())]
)
ANSWER_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
        ("num_prompt_tokens", pa.int32()),
        ("num_cached_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()),
        ("logprobs", pa.list_(pa.float64())),
        ("error", pa.string()),  # non-null: this request got no answer, and why
    ]
)
MAX_ROWS_PER_ANSWER_BATCH = 256


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


class FlightEngineServer(flight.FlightServerBase):
    """Arrow Flight front of an EngineService (see the module docstring for the protocol)."""

    def __init__(self, service: EngineService, location: str, model_id: str):
        super().__init__(location)
        self.service = service
        self.model_id = model_id

    def do_exchange(self, context, descriptor, reader, writer):
        client_id, params = _parse_command(descriptor.command)
        ids, prompts = _read_requests(reader)
        try:
            call = self.service.submit(client_id, prompts, params)
        except ServiceUnavailable as exc:
            raise flight.FlightUnavailableError(str(exc)) from exc
        writer.begin(ANSWER_SCHEMA)
        num_left = len(prompts)
        try:
            while num_left:
                results = [call.next_answer()]
                while len(results) < MAX_ROWS_PER_ANSWER_BATCH:
                    try:
                        results.append(call.results.get_nowait())
                    except queue.Empty:
                        break
                num_left -= len(results)
                writer.write_batch(_answer_batch(results, ids))
        except BaseException:
            self.service.cancel(call)  # the client went away: free its engine slots
            raise

    def do_action(self, context, action):
        if action.type == "health":
            body = {"alive": self.service.is_alive, "error": self.service.load_error}
        elif action.type == "ready":
            body = {"ready": self.service.is_ready, "model": self.model_id}
        elif action.type == "stats":
            body = {
                "num_waiting": self.service.num_waiting,
                "num_running": self.service.num_running,
                "num_served": self.service.num_served,
                "pid": os.getpid(),
                "engine": _engine_stats(self.service.engine),
            }
        else:
            raise flight.FlightServerError(
                f"unknown action {action.type!r}; known: health, ready, stats"
            )
        yield flight.Result(json.dumps(body).encode())

    def list_actions(self, context):
        return [
            ("health", "is the engine loop alive"),
            ("ready", "is the model loaded and the server accepting work"),
            ("stats", "queue lengths and requests served"),
        ]


def _engine_stats(engine) -> dict | None:
    """The engine's counters (None before it is built): steps, tokens, time in steps."""
    stats = getattr(engine, "stats", None)
    if stats is None:
        return None
    return {
        "num_steps": stats.num_steps,
        "num_prompt_tokens": stats.num_prompt_tokens,
        "num_cached_tokens": stats.num_cached_tokens,
        "num_forward_tokens": stats.num_forward_tokens,
        "elapsed_s": round(stats.elapsed_s, 4),
    }


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
            self._write_state_file()
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
            _remove_own_state_file(Path(self.config.state_file))

    def _default_factory(self):
        from llmudf.engine.config import EngineConfig
        from llmudf.engine.engine import Engine

        return Engine(EngineConfig(model=self.config.model, **(self.config.engine or {})))

    def _write_state_file(self) -> None:
        path = Path(self.config.state_file)
        state = {
            "pid": os.getpid(),
            "location": self.location,
            "http_port": self.http_port,
            "model": self.model_id,
        }
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)  # readers never see a half-written file


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


# ---- private ---------------------------------------------------------------------------------


def _parse_command(command: bytes) -> tuple[str, object]:
    from llmudf.engine.sampling import SamplingParams

    try:
        cmd = json.loads(command or b"{}")
        client_id = str(cmd.get("client_id") or "anonymous")
        params = SamplingParams(**(cmd.get("params") or {}))
    except (ValueError, TypeError, AttributeError) as exc:
        raise pa.ArrowInvalid(f"bad request command: {exc}") from exc
    return client_id, params


def _read_requests(reader) -> tuple[list[int], list]:
    try:
        table = reader.read_all()
    except pa.ArrowException as exc:
        raise pa.ArrowInvalid(f"bad request batch: {exc}") from exc
    names = table.column_names
    if "id" not in names or not ({"user", "prompt"} & set(names)):
        raise pa.ArrowInvalid(
            "bad request batch: need an id column and a user (chat, optional system) or "
            f"prompt (templated text) column; got columns {names}"
        )
    try:
        ids = table.column("id").cast(pa.int64()).to_pylist()
        column = lambda name: (
            table.column(name).cast(pa.string()).to_pylist() if name in names else None
        )
        users, systems, texts = column("user"), column("system"), column("prompt")
    except pa.ArrowException as exc:
        raise pa.ArrowInvalid(f"bad request batch: {exc}") from exc
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise pa.ArrowInvalid("bad request batch: ids must be non-null and distinct")
    prompts = []
    for row in range(len(ids)):
        user = users[row] if users else None
        text = texts[row] if texts else None
        if (user is None) == (text is None):
            raise pa.ArrowInvalid(
                f"bad request batch: row {row} (id {ids[row]}) needs exactly one of user, prompt"
            )
        system = systems[row] if systems else None
        prompts.append(text if user is None else ChatPrompt(user, system=system))
    return ids, prompts


def _answer_batch(results, ids: list[int]) -> pa.RecordBatch:
    outs = [r.output for r in results]
    col = lambda name, default: [getattr(o, name) if o is not None else default for o in outs]
    return pa.RecordBatch.from_pydict(
        {
            "id": [ids[r.index] for r in results],
            "text": col("text", None),
            "token_ids": [list(o.token_ids) if o is not None else None for o in outs],
            "finish_reason": col("finish_reason", None),
            "num_prompt_tokens": col("num_prompt_tokens", 0),
            "num_cached_tokens": col("num_cached_tokens", 0),
            "num_generated_tokens": col("num_generated_tokens", 0),
            "logprobs": col("logprobs", None),
            "error": [r.error for r in results],
        },
        schema=ANSWER_SCHEMA,
    )


def _remove_own_state_file(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(serve_main(add_serve_arguments(argparse.ArgumentParser()).parse_args()))
