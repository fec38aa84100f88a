"""Engine clients: "something that answers prompts", behind one small interface.

`EngineClient.generate(prompts, params, progress=None) -> list[Output]` answers a batch of
`ChatPrompt`s (in order); `progress(n)` is called as n more answers finish. A client may also
take `on_output(index, output)`, called as each prompt is answered, so that a batch that
fails or is interrupted half-way still hands over the answers it has (`generate_partial`
passes it to clients that take it). `model_id` names the model in result-cache keys, so
every client of the same model shares answers.
`InProcessClient` runs an `Engine` in this process, built on first use and shared by every
client of the same model config; `get_client(config)` picks the client for a Config's
`backend`: in-process, an engine server over Arrow Flight (`FlightEngineClient`), or an
OpenAI-compatible endpoint (`OpenAIClient`).

>>> client = get_client(Config())                                     # doctest: +SKIP
>>> client.generate([ChatPrompt("Capital of France?")], SamplingParams())[0].text  # doctest: +SKIP
'Paris'
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmudf.config import Config
from llmudf.paths import weights_id
from llmudf.prompt import ChatPrompt

if TYPE_CHECKING:
    from llmudf.engine.request import Output

Progress = Callable[[int], None]
OnOutput = Callable[[int, "Output"], None]  # (prompt index, its Output)


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_id(self) -> str: ...

    def generate(self, prompts: list[ChatPrompt], params, progress: Progress | None = None): ...


def generate_partial(
    client: EngineClient,
    prompts: list[ChatPrompt],
    params,
    progress: Progress | None = None,
    on_output: OnOutput | None = None,
) -> list[Output]:
    """`client.generate`, also passing `on_output` if the client takes it (it is optional in
    the interface: a client without it reports nothing until the whole batch is done).

    >>> done = {}  # prompt index -> Output, kept if the batch is interrupted
    >>> generate_partial(client, prompts, params, on_output=done.__setitem__)  # doctest: +SKIP
    """
    if on_output is not None and _takes(client.generate, "on_output"):
        return client.generate(prompts, params, progress=progress, on_output=on_output)
    return client.generate(prompts, params, progress=progress)


class InProcessClient:
    """An Engine in this process; the first `generate` builds it (loads the model)."""

    def __init__(self, model: str | None = None, engine: dict | None = None):
        self.model = model
        self.engine_options = dict(engine or {})
        self._engine = None
        self._lock = threading.Lock()  # one batch at a time: the Engine is not thread-safe

    @property
    def model_id(self) -> str:
        return weights_id(self.model)

    @property
    def engine(self):
        """The Engine, built on first use."""
        if self._engine is None:
            from llmudf.engine.config import EngineConfig
            from llmudf.engine.engine import Engine

            self._engine = Engine(EngineConfig(model=self.model, **self.engine_options))
        return self._engine

    @property
    def tokenizer(self):
        """The model's tokenizer, without loading its weights when the Engine is not built."""
        if self._engine is not None:
            return self._engine.tokenizer
        from llmudf.engine.tokenizer import Tokenizer
        from llmudf.engine.weights import resolve_model_dir

        return Tokenizer.from_dir(resolve_model_dir(self.model))

    def generate(
        self,
        prompts: list[ChatPrompt],
        params,
        progress: Progress | None = None,
        on_output: OnOutput | None = None,
    ):
        with self._lock:
            engine = self.engine
            if not prompts:
                return []
            return engine.generate(list(prompts), params, progress=progress, on_output=on_output)


_CLIENTS: dict[str, EngineClient] = {}
_CLIENTS_LOCK = threading.Lock()


def get_client(config: Config) -> EngineClient:
    """The process-wide client for `config`'s backend, endpoint, model and engine options
    (built once, shared).

    >>> get_client(Config(backend="server")).location              # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    """
    key = json.dumps(
        [config.backend, config.endpoint, config.api_key, config.model, config.engine],
        sort_keys=True,
        default=str,
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _new_client(config)
        return client


def _takes(function: Callable, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _new_client(config: Config) -> EngineClient:
    if config.backend == "server":
        from llmudf.engine.flight_client import FlightEngineClient

        # endpoint None: this machine's server for the model, started on first use
        return FlightEngineClient(config.endpoint, model=config.model, engine=config.engine)
    if config.backend == "openai":
        from llmudf.connectors.openai_backend import OpenAIClient, first_model

        model = config.model or first_model(config.endpoint, config.api_key)
        return OpenAIClient(config.endpoint, model, api_key=config.api_key)
    return InProcessClient(config.model, config.engine)
