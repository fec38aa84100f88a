"""Engine clients: "something that answers prompts", behind one small interface.

`EngineClient.generate(prompts, params, progress=None, on_output=None) -> list[Output]`
answers a batch of chats (message lists `[{"role": ..., "content": ...}]`, in order; the
engine's prompt contract, engine/prompts.py). `progress(n)` is called as n more answers
finish, and `on_output(index, output)` as each prompt is answered, so that a batch that fails
or is interrupted half-way still hands over the answers it has. `model_id` names the model
in result-cache keys, so every client of the same model shares answers.
`InProcessClient` runs an `Engine` in this process, built on first use and shared by every
client of the same model config; `get_client(config)` picks the client for a Config's
`backend`: in-process, an engine server over Arrow Flight (`FlightEngineClient`), or an
OpenAI-compatible endpoint (`OpenAIClient`).

>>> client = get_client(Config())                                     # doctest: +SKIP
>>> chat = ChatPrompt("Capital of France?").messages()
>>> client.generate([chat], SamplingParams())[0].text               # doctest: +SKIP
'Paris'
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmudf.calls.config import Config
from llmudf.engine.flight_client import FlightEngineClient
from llmudf.runtime.paths import weights_id

if TYPE_CHECKING:
    from llmudf.engine.params import Output

Chat = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": str}]
Progress = Callable[[int], None]
OnOutput = Callable[[int, "Output"], None]  # (prompt index, its Output)


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_id(self) -> str: ...

    def generate(
        self,
        prompts: list[Chat],
        params,
        progress: Progress | None = None,
        on_output: OnOutput | None = None,
    ) -> list[Output]: ...


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
        prompts: list[Chat],
        params,
        progress: Progress | None = None,
        on_output: OnOutput | None = None,
    ):
        with self._lock:
            engine = self.engine
            if not prompts:
                return []
            return engine.generate(list(prompts), params, progress=progress, on_output=on_output)


class ServerClient(FlightEngineClient):
    """An engine server's Flight client, named in result-cache keys by its model's weights."""

    @property
    def model_id(self) -> str:
        return weights_id(self.model)


_CLIENTS: dict[str, EngineClient] = {}
_CLIENTS_LOCK = threading.Lock()


def get_client(config: Config) -> EngineClient:
    """The process-wide client for `config`'s backend, endpoint, model and engine options
    (built once, shared).

    >>> get_client(Config(backend="server")).location              # doctest: +SKIP
    'grpc://127.0.0.1:40123'
    """
    key = _client_key(config)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _new_client(config)
        return client


def measured_tokens_per_s(config: Config) -> float | None:
    """The forward tokens per second of `config`'s in-process engine so far, for EXPLAIN's
    time estimate; None when it has not run yet (or runs elsewhere)."""
    engine = getattr(_CLIENTS.get(_client_key(config)), "_engine", None)
    stats = getattr(engine, "stats", None)
    if stats is None or not stats.elapsed_s or not stats.num_forward_tokens:
        return None
    return stats.num_forward_tokens / stats.elapsed_s


def _client_key(config: Config) -> str:
    return json.dumps(
        [config.backend, config.endpoint, config.api_key, config.model, config.engine],
        sort_keys=True,
        default=str,
    )


def _new_client(config: Config) -> EngineClient:
    if config.backend == "server":
        # endpoint None: this machine's server for the model, started on first use
        return ServerClient(
            config.endpoint, model=config.model, engine=config.engine, api_key=config.api_key
        )
    if config.backend == "openai":
        from llmudf.runtime.openai_client import OpenAIClient, first_model

        model = config.model or first_model(config.endpoint, config.api_key)
        return OpenAIClient(config.endpoint, model, api_key=config.api_key)
    return InProcessClient(config.model, config.engine)


def explain_tokenizer(config: Config):
    """(tokenize, render) for EXPLAIN: the model's tokenizer and its chat template around a
    user message, or (None, None) when there is no tokenizer without loading a model (then
    EXPLAIN counts characters)."""
    from llmudf.calls.prompt import ChatPrompt

    try:
        tokenizer = get_client(config).tokenizer
    except Exception:
        return None, None
    return tokenizer.encode_batch, lambda user: tokenizer.apply_chat_template(
        ChatPrompt(user).messages()
    )
