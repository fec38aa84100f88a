"""The HTTP API's server: uvicorn on its own thread and event loop, in the engine server's
process, so `EngineServer` starts and drains it with the Flight server.

The listening socket is made here (backlog 2048: a burst of clients is queued, not reset)
and handed to uvicorn; in front of the app sits engine/http_guard.py.

>>> server = HTTPServer(service, "smollm2", HTTPConfig()).start()       # doctest: +SKIP
>>> openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1",
...               api_key="none").models.list().data[0].id              # doctest: +SKIP
'smollm2'
"""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn

from llmudf.engine.http_api import PATHS, HTTPConfig, create_app
from llmudf.engine.http_guard import Guard, GuardConfig, GuardedH11Protocol
from llmudf.engine.metrics import ServerMetrics
from llmudf.engine.service import EngineService

GRACEFUL_SHUTDOWN_S = 5


class HTTPServer:
    """uvicorn on its own thread and event loop, serving `create_app`; `stop()` ends it."""

    def __init__(self, service: EngineService, model_id: str, config: HTTPConfig):
        self.config = config
        self.metrics = ServerMetrics(service, PATHS)
        app = create_app(service, model_id, config, self.metrics)
        guard = GuardConfig(config.api_key, config.max_body_bytes, config.read_timeout)
        guarded = Guard(app, guard, self.metrics)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                guarded,
                http=type(
                    "Protocol", (GuardedH11Protocol,), {"header_timeout": config.read_timeout}
                ),
                lifespan="off",
                log_config=None,
                access_log=False,
                backlog=config.backlog,
                limit_concurrency=config.max_connections,
                timeout_keep_alive=config.keep_alive_timeout,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        )
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((config.host, config.port))
        self._socket.listen(config.backlog)
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="llmudf-http", daemon=True)

    def start(self) -> HTTPServer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the responses under way (up to GRACEFUL_SHUTDOWN_S), then close."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def _serve(self) -> None:
        asyncio.run(self._uvicorn.serve(sockets=[self._socket]))
