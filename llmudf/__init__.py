"""llmudf: call LLMs inside analytical queries, and pay for as little inference as possible.

>>> import llmudf
>>> con = llmudf.connect()                                   # doctest: +SKIP
>>> con.sql("SELECT llm('Summarize', title) FROM movies")    # doctest: +SKIP

Heavy modules (torch, duckdb) are imported on first use, so `import llmudf` stays cheap.
"""

import os
from importlib import import_module

# OpenMP threads that spin while waiting steal the cores DuckDB's / Spark's own threads run
# on; with busy-waiting, a torch forward on a loaded 2-core machine ran ~10x slower (measured:
# `llmudf generate` 67.9 s vs 6.4 s). It only takes effect if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it; resolved lazily by __getattr__
_LAZY = {
    "connect": "llmudf.connectors.duckdb",
    "Connection": "llmudf.connectors.duckdb",
    "register": "llmudf.connectors.duckdb",
    "Config": "llmudf.calls.config",
    "LLMCallError": "llmudf.calls.functions",
    "Engine": "llmudf.engine.engine",
    "EngineConfig": "llmudf.engine.config",
    "SamplingParams": "llmudf.engine.params",
}
_SUBMODULES = ("datasets",)  # `llmudf.datasets.movies(con)` without importing it first

# `df.llm` on pandas (and Polars, when installed) frames and Series; `llmudf.frame` holds
# the operators and the default Config of frame calls
from llmudf import frame_accessors as _frame_accessors  # noqa: E402

_frame_accessors.register_accessors()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return import_module(f"llmudf.{name}")
    raise AttributeError(f"module 'llmudf' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBMODULES])


def load_ipython_extension(ipython) -> None:
    """`%load_ext llmudf`: the `%%llm_sql` / `%llm_sql` magics (see llmudf.magic)."""
    from llmudf.magic import load_ipython_extension

    load_ipython_extension(ipython)
