"""The `llm` accessor of pandas and Polars DataFrames and Series: thin methods over the
operators of `llmudf.frame`. `import llmudf` registers it (Polars only when installed).

>>> import pandas as pd, llmudf
>>> df = pd.DataFrame({"title": ["Up", "Heat"], "genre": ["Animation", "Crime"]})
>>> df["mood"] = df.llm.map("One-word mood?", ["title"], max_tokens=4)  # doctest: +SKIP
>>> df.llm.last_stats.num_requests                                      # doctest: +SKIP
2
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmudf.calls.config import Config
    from llmudf.optimizer.explain import LLMExplain
    from llmudf.runtime.executor import CallStats


def _frame():
    """`llmudf.frame`, imported on the first call: `import llmudf` (which registers these
    accessors) stays cheap for processes that never use them, e.g. Spark's Python workers
    and engine servers."""
    return importlib.import_module("llmudf.frame")


__all__ = ["DataFrameLLM", "SeriesLLM", "register_accessors"]


class _LLM:
    def __init__(self, obj):
        self._obj = obj

    @property
    def last_stats(self) -> CallStats | None:
        """The CallStats of the latest LLM call on this frame (None before any).

        >>> df.llm.map("Summarize", ["title"]); df.llm.last_stats.num_sent   # doctest: +SKIP
        """
        return _frame().last_stats(self._obj)

    def explain(self, op: str, *args, **kwargs) -> LLMExplain:
        """What `self.llm.<op>(*args, **kwargs)` would do, without running the model: rows,
        prompts after dedup, estimated tokens, field order (as `con.explain_llm`).

        >>> print(df.llm.explain("filter", "Is it animated?", ["title"]))    # doctest: +SKIP
        """
        return _frame().llm_explain(self._obj, op, *args, **kwargs)


class DataFrameLLM(_LLM):
    """`df.llm`: the LLM functions over a pandas or Polars DataFrame, one call site per call.

    `fields`: a list of column names, {field name: column name}, or None for every column.
    Options: `config=` a `llmudf.Config` (default: `llmudf.frame.set_config`), and the SQL
    per-call options as keywords (max_tokens, temperature, top_p, top_k, seed, model).
    """

    def map(self, instruction: str, fields=None, *, config: Config | None = None, **options):
        """Free text per row (SQL `llm`), a Series in the frame's order and index.

        >>> df.llm.map("Summarize the plot.", ["title", "plot"], max_tokens=64)  # doctest: +SKIP
        """
        return _frame().llm_map(self._obj, instruction, fields, config=config, **options)

    def filter(self, instruction: str, fields=None, *, config: Config | None = None, **options):
        """The rows the model answers yes for (SQL `llm_filter`).

        >>> df.llm.filter("Is it suitable for children?", ["title", "genre"])  # doctest: +SKIP
        """
        return _frame().llm_filter(self._obj, instruction, fields, config=config, **options)

    def choice(
        self, instruction: str, choices, fields=None, *, config: Config | None = None, **options
    ):
        """One of `choices` per row (SQL `llm_choice`).

        >>> df.llm.choice("Mood?", ["happy", "sad"], ["title"])               # doctest: +SKIP
        """
        return _frame().llm_choice(
            self._obj, instruction, choices, fields, config=config, **options
        )

    def score(self, instruction: str, fields=None, *, config: Config | None = None, **options):
        """A float score 1..5 per row (SQL `llm_score`).

        >>> df.llm.score("How violent is it?", ["title", "genre"]).mean()      # doctest: +SKIP
        """
        return _frame().llm_score(self._obj, instruction, fields, config=config, **options)

    def json(
        self,
        instruction: str,
        schema,
        fields=None,
        expand: bool = False,
        *,
        config: Config | None = None,
        **options,
    ):
        """An object valid against `schema` per row (SQL `llm_json`); `expand=True`: one
        column per schema property.

        >>> schema = {"type": "object", "properties": {"year": {"type": "integer"}}}
        >>> df.llm.json("Release year?", schema, ["title"], expand=True)     # doctest: +SKIP
        """
        return _frame().llm_json(
            self._obj, instruction, schema, fields, expand, config=config, **options
        )

    def reduce(
        self, instruction: str, fields=None, by=None, *, config: Config | None = None, **options
    ):
        """One answer per group of rows (SQL `llm_reduce ... GROUP BY by`): a Series indexed by
        the group keys; by=None: one str for the whole frame (`llmudf.frame_reduce`).

        >>> df.llm.reduce("What do they share?", ["title"], by="genre")      # doctest: +SKIP
        """
        module = importlib.import_module("llmudf.frame_reduce")
        return module.llm_reduce(self._obj, instruction, fields, by, config=config, **options)


class SeriesLLM(_LLM):
    """`s.llm`: the LLM functions over one named pandas or Polars Series (its name is the
    field name in the prompt; an unnamed Series is an error). Options as for `df.llm`.
    """

    def map(self, instruction: str, *, config: Config | None = None, **options):
        """Free text per value (SQL `llm`).

        >>> df["title"].llm.map("Translate to French.")                      # doctest: +SKIP
        """
        return _frame().llm_map(self._obj, instruction, config=config, **options)

    def filter(self, instruction: str, *, config: Config | None = None, **options):
        """The values the model answers yes for (SQL `llm_filter`).

        >>> df["title"].llm.filter("Is it a sequel?")                        # doctest: +SKIP
        """
        return _frame().llm_filter(self._obj, instruction, config=config, **options)

    def choice(self, instruction: str, choices, *, config: Config | None = None, **options):
        """One of `choices` per value (SQL `llm_choice`).

        >>> df["title"].llm.choice("Language?", ["English", "other"])        # doctest: +SKIP
        """
        return _frame().llm_choice(self._obj, instruction, choices, config=config, **options)

    def score(self, instruction: str, *, config: Config | None = None, **options):
        """A float score 1..5 per value (SQL `llm_score`).

        >>> df["title"].llm.score("How catchy is it?")                       # doctest: +SKIP
        """
        return _frame().llm_score(self._obj, instruction, config=config, **options)

    def json(
        self,
        instruction: str,
        schema,
        expand: bool = False,
        *,
        config: Config | None = None,
        **options,
    ):
        """An object valid against `schema` per value (SQL `llm_json`).

        >>> df["title"].llm.json("Facts?", {"type": "object", "properties": {}})  # doctest: +SKIP
        """
        return _frame().llm_json(
            self._obj, instruction, schema, None, expand, config=config, **options
        )


def register_accessors() -> None:
    """Register `llm` on pandas DataFrame / Series, and on Polars' when it is installed
    (without importing Polars otherwise). Safe to call again."""
    import pandas as pd

    _register(pd.DataFrame, DataFrameLLM, pd.api.extensions.register_dataframe_accessor)
    _register(pd.Series, SeriesLLM, pd.api.extensions.register_series_accessor)
    if importlib.util.find_spec("polars") is not None:
        import polars as pl

        _register(pl.DataFrame, DataFrameLLM, pl.api.register_dataframe_namespace)
        _register(pl.Series, SeriesLLM, pl.api.register_series_namespace)


def _register(cls, accessor, register) -> None:
    existing = getattr(cls, "llm", None)
    if existing is accessor:
        return
    with warnings.catch_warnings():
        if getattr(existing, "__module__", None) == __name__:  # a reloaded llmudf's own
            warnings.simplefilter("ignore", UserWarning)
        register("llm")(accessor)
