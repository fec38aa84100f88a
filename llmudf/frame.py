"""The LLM functions as DataFrame operators, for pandas and Polars frames and Series.

Each operator is a pure function of a frame (`llm_map(df, instruction, fields)`); the `llm`
accessor (`df.llm.map(...)`, `llmudf.frame_accessors`) only forwards to it. One call is one
SQL call site over the whole frame: the fields become Arrow columns named by their column
(or by the key of a {field name: column} mapping), and `run_call` plans them (dedup, row
order), skips answers already in the result cache and sends the rest to the engine as one
batch. So `df.llm.map("Q", ["title"])` gives the prompts and answers of
`SELECT llm('Q', title) FROM df`, in the frame's row order and with its index.

Connection-wide settings come from a `Config`: the module default (`set_config`), or
`config=` on one call. Per-call options (max_tokens, temperature, top_p, top_k, seed,
model) are keyword arguments, checked as in SQL.

>>> import pandas as pd, llmudf
>>> llmudf.frame.set_config(max_tokens=16)                           # doctest: +SKIP
>>> movies = pd.DataFrame({"title": ["Up", "Heat"], "year": [2009, 1995]})
>>> movies.llm.filter("Is it animated?")                             # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import weakref
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import CallSpec, LLMCallError, bind_call
from llmudf.frame_tables import FrameTable, is_series
from llmudf.optimizer.explain import LLMExplain, explain_call
from llmudf.optimizer.plan import PlanOptions, plan_call
from llmudf.runtime.cache import open_cache
from llmudf.runtime.client import explain_tokenizer, get_client, measured_tokens_per_s
from llmudf.runtime.executor import CallStats, run_call

__all__ = [
    "get_config",
    "last_stats",
    "llm_choice",
    "llm_explain",
    "llm_filter",
    "llm_json",
    "llm_map",
    "llm_score",
    "set_config",
]

_config = Config()
_STATS: dict[int, CallStats] = {}  # id(frame) -> its latest call; dropped with the frame


def set_config(config: Config | None = None, **options) -> None:
    """Set the Config every frame call uses unless it passes `config=`: a Config, or
    keyword options (fields of `llmudf.Config`).

    >>> llmudf.frame.set_config(model="path/to/model.gguf", max_tokens=16)  # doctest: +SKIP
    """
    global _config
    if config is not None and options:
        raise TypeError("pass either a Config or keyword options, not both")
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a llmudf.Config, got {type(config).__name__}")
    _config = config if config is not None else Config.from_kwargs(**options)


def get_config() -> Config:
    """The Config frame calls use by default (see `set_config`)."""
    return _config


def last_stats(frame) -> CallStats | None:
    """The CallStats of the latest LLM call on `frame` (None before any): rows, prompts
    after dedup, cache hits, tokens. Also `df.llm.last_stats`.

    >>> df.llm.map("Summarize", ["title"])                               # doctest: +SKIP
    >>> llmudf.frame.last_stats(df).num_requests                         # doctest: +SKIP
    """
    return _STATS.get(id(frame))


# ---- the operators -------------------------------------------------------------------------


def llm_map(frame, instruction: str, fields=None, *, config: Config | None = None, **options):
    """Free text per row, as SQL's `llm(instruction, field, ...)`: a Series in the frame's
    order (pandas: with its index). `fields`: column names, {field name: column}, or None
    for every column.

    >>> llm_map(movies, "One-word mood?", ["title"], max_tokens=4)       # doctest: +SKIP
    """
    call = _prepare(frame, "map", instruction, None, fields, options, config)
    return call.table.series(_run(call).to_pylist(), "llm", "string")


def llm_filter(frame, instruction: str, fields=None, *, config: Config | None = None, **options):
    """The rows whose `llm_filter` answer is yes (a NULL answer drops the row).

    >>> llm_filter(movies, "Is it animated?", ["title", "year"])          # doctest: +SKIP
    """
    call = _prepare(frame, "filter", instruction, None, fields, options, config)
    keep = np.fromiter((a is True for a in _run(call).to_pylist()), bool, call.table.num_rows)
    return call.table.take(keep)


def llm_choice(
    frame, instruction: str, choices, fields=None, *, config: Config | None = None, **options
):
    """One of `choices` per row, as SQL's `llm_choice`.

    >>> llm_choice(movies, "Genre?", ["comedy", "drama", "other"], ["title"])  # doctest: +SKIP
    """
    call = _prepare(frame, "choice", instruction, choices, fields, options, config)
    return call.table.series(_run(call).to_pylist(), "llm_choice", "string")


def llm_score(frame, instruction: str, fields=None, *, config: Config | None = None, **options):
    """A float score from 1 to 5 per row, as SQL's `llm_score`.

    >>> llm_score(movies, "How family-friendly is it?", ["title"]).mean()  # doctest: +SKIP
    """
    call = _prepare(frame, "score", instruction, None, fields, options, config)
    return call.table.series(_run(call).to_pylist(), "llm_score", "float")


def llm_json(
    frame,
    instruction: str,
    schema,
    fields=None,
    expand: bool = False,
    *,
    config: Config | None = None,
    **options,
):
    """An object valid against the JSON `schema` (a dict or JSON text) per row, as SQL's
    `llm_json`; None where the answer breaks the schema. pandas: a Series of dicts; Polars:
    a Struct Series typed by the schema (an Object Series of dicts if the schema does not
    fix every type). `expand=True`: a frame of one column per schema property instead.

    >>> schema = {"type": "object", "properties": {"year": {"type": "integer"}}}
    >>> llm_json(movies, "When was it released?", schema, ["title"], expand=True)  # doctest: +SKIP
    """
    call = _prepare(frame, "json", instruction, schema, fields, options, config)
    parsed = json.loads(call.spec.json_schema)
    properties = parsed.get("properties") if parsed.get("type") == "object" else None
    if expand and not (isinstance(properties, dict) and properties):
        raise LLMCallError(
            f"{call.site}: expand=True needs a schema of an object with properties, got "
            f"{call.spec.json_schema}"
        )
    values = [None if t is None else json.loads(t) for t in _run(call).to_pylist()]
    if not expand:
        return call.table.json_series(values, "llm_json", parsed)
    columns = {
        name: [v.get(name) if isinstance(v, dict) else None for v in values] for name in properties
    }
    return call.table.json_frame(columns, properties)


_OPERATORS = {
    "map": llm_map,
    "filter": llm_filter,
    "choice": llm_choice,
    "score": llm_score,
    "json": llm_json,
}
_FUNCTIONS = {
    "map": "llm",
    "filter": "llm_filter",
    "choice": "llm_choice",
    "score": "llm_score",
    "json": "llm_json",
}


def llm_explain(frame, op: str, *args, **kwargs) -> LLMExplain:
    """What the operator `op` ("map", "filter", "choice", "score", "json") would do with
    these arguments, without running the model: the data of SQL's `con.explain_llm` (rows,
    prompts after dedup, estimated prompt and prefix-cached tokens, field order).

    >>> print(llm_explain(movies, "filter", "Is it animated?", ["title"]))  # doctest: +SKIP
    """
    site = _site(frame, op)
    if op not in _OPERATORS:
        raise LLMCallError(f"{site}: unknown operator {op!r}; one of {list(_OPERATORS)}")
    try:
        bound = inspect.signature(_OPERATORS[op]).bind(frame, *args, **kwargs).arguments
    except TypeError as exc:
        raise TypeError(f"{site}: {exc}") from None
    call = _prepare(
        frame,
        op,
        bound["instruction"],
        bound.get("choices", bound.get("schema")),
        bound.get("fields"),
        bound.get("options", {}),
        bound.get("config"),
    )
    config = call.spec.config(call.config)
    options = PlanOptions.from_config(config)
    plan = plan_call(call.spec.instruction(call.instruction), call.fields, options)
    tokenize, render = explain_tokenizer(config)
    info = explain_call(
        call.site,
        call.instruction,
        plan,
        (),
        tokenize,
        render,
        tokens_per_s=measured_tokens_per_s(config),
        new_tokens=call.spec.max_new_tokens(call.spec.config(config)),
    )
    return LLMExplain("", (info,))


# ---- private helpers -----------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """One frame call, bound and checked, before it runs."""

    site: str  # "df.llm.map": names the call in errors and in its CallStats
    spec: CallSpec
    instruction: str
    fields: pa.Table  # one column per field, named by field
    config: Config
    table: FrameTable  # the frame the answers go back to


def _prepare(frame, op: str, instruction, const, fields, options: dict, config) -> _Call:
    site = _site(frame, op)
    if not isinstance(instruction, str):
        raise LLMCallError(f"{site}: the instruction must be a str, got {instruction!r}")
    if config is None:
        config = _config
    elif not isinstance(config, Config):
        raise TypeError(f"{site}: config must be a llmudf.Config, got {type(config).__name__}")
    spec = bind_call(_FUNCTIONS[op], const, options, site)
    table = FrameTable.of(frame, site)
    return _Call(site, spec, instruction, table.fields_table(fields), config, table)


def _run(call: _Call) -> pa.Array:
    """The answers of `call`, one per row, as run_call gives them; records its stats."""
    config = call.config
    cache = open_cache(config.cache_dir) if config.cache else None
    client = get_client(call.spec.config(config))
    result = run_call(call.spec, call.instruction, call.fields, config, client, cache)
    owner = call.table.obj
    if id(owner) not in _STATS:
        weakref.finalize(owner, _STATS.pop, id(owner), None)
    _STATS[id(owner)] = result.stats
    return result.answers


def _site(frame, op: str) -> str:
    return f"{'s' if is_series(frame) else 'df'}.llm.{op}"
