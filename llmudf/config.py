"""Config: every user-facing knob of llmudf in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

OPTION_KEYS = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed")
BACKENDS = ("local", "server", "openai")
_SERVER_SCHEMES = ("grpc://", "grpc+tcp://", "grpc+unix://")


@dataclass(slots=True)
class Config:
    """How llmudf answers the LLM calls of a query.

    model: a Hugging Face model folder, a .gguf file, or None for the default
    SmolLM2-135M-Instruct (with backend="openai": the endpoint's model name, None = the
    first one its /v1/models lists). engine: extra `EngineConfig` fields (device,
    kv_cache_bytes, ...) of an engine llmudf starts itself.
    backend: who answers the prompts. "local": an engine in this process; "server": an
    llmudf engine server over Arrow Flight, at `endpoint` ("grpc://host:port" or
    "grpc+unix:///path"), or with endpoint=None this machine's server for `model`, started
    on first use and shared by every process; "openai": any OpenAI-compatible endpoint
    (`endpoint` = its base URL, e.g. "http://127.0.0.1:8000/v1"; `api_key`, default
    $OPENAI_API_KEY). Spark tasks always use a server: the node's, unless backend says
    otherwise.
    cache / cache_dir: the persistent result cache (default dir: `llmudf.paths.result_cache_dir()`).
    progress: show a progress bar while a batch runs (only ever on a terminal).
    rewrite: optimize each query as a whole (False = per-chunk UDF only).
    dedup: send each distinct prompt once. reorder_rows: send prompts that share prefixes
    one after another. reorder_fields: also reorder the fields inside each prompt (GGR); off
    by default because it changes the prompt text, and so may change answers: with it off,
    greedy answers do not depend on the plan.
    max_tokens, temperature, top_p, top_k, seed: default decoding of `llm` and `llm_json`
    (filters, choices and scores decode one constrained choice).

    >>> Config(max_tokens=16).with_options({"temperature": 0.5}).temperature
    0.5
    >>> Config(backend="openai", endpoint="http://127.0.0.1:8000/v1").backend
    'openai'
    """

    model: str | None = None
    engine: dict = field(default_factory=dict)
    cache: bool = True
    cache_dir: str | Path | None = None
    progress: bool = True
    rewrite: bool = True
    dedup: bool = True
    reorder_rows: bool = True
    reorder_fields: bool = False
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    backend: str = "local"
    endpoint: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self._check_backend()
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not isinstance(self.engine, dict):
            raise TypeError(f"engine must be a dict of EngineConfig fields, got {self.engine!r}")

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "local" and self.endpoint is not None:
            raise ValueError(
                f"endpoint={self.endpoint!r} needs backend='server' (an llmudf engine server) "
                "or backend='openai' (an OpenAI-compatible endpoint)"
            )
        if self.backend == "openai":
            if not self.endpoint or not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(
                    "backend='openai' needs endpoint= the base URL of an OpenAI-compatible "
                    f"API, e.g. 'http://127.0.0.1:8000/v1'; got {self.endpoint!r}"
                )
        elif self.api_key is not None:
            raise ValueError(f"api_key is only used with backend='openai', not {self.backend!r}")
        is_server = self.backend == "server" and self.endpoint is not None
        if is_server and not self.endpoint.startswith(_SERVER_SCHEMES):
            raise ValueError(
                "backend='server' needs endpoint= a Flight location "
                "('grpc://host:port' or 'grpc+unix:///path/to/socket'), or None for this "
                f"machine's server; got {self.endpoint!r}"
            )

    @classmethod
    def from_kwargs(cls, **kwargs) -> Config:
        """A Config from keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown llmudf option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def with_options(self, options: dict) -> Config:
        """This config with per-call options (a trailing struct argument) applied."""
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"unknown call option(s) {unknown}; known: {list(OPTION_KEYS)}")
        return replace(self, **options) if options else self
