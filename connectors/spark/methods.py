"""The DataFrame methods that answer LLM Columns: classic PySpark's `select`, `where` /
`filter`, `withColumn(s)`, `orderBy` / `sort`, `agg`, `groupBy` and `GroupedData.agg`.

`install()` wraps them on the classes, once (idempotent and thread-safe); `uninstall()` puts
the originals back. `import llmudf.spark` installs them: a bound method such as `df.select`
is looked up before its arguments are made, so the wrappers cannot wait for the first
`llm(...)`. A wrapper calls the original untouched unless an LLM Column is among its
arguments; then it answers those Columns' sites on the DataFrame it is called on
(`frame.with_answers`), runs the original there and drops the answer columns from the result.
Spark Connect's DataFrame is not wrapped (not covered yet).

>>> install(); install()  # the second call does nothing                   # doctest: +SKIP
>>> uninstall()  # DataFrame.select etc. are PySpark's own again               # doctest: +SKIP
"""

from __future__ import annotations

import functools
import threading

from llmudf.connectors.spark.frame import (
    is_passing_through,
    passing_through,
    site_of,
    sites_in,
    with_answers,
)

__all__ = ["install", "is_installed", "uninstall"]

_METHODS = ("select", "where", "filter", "withColumn", "withColumns", "orderBy", "sort", "agg")
_MISSING = object()
_ORIGINALS: dict[tuple[type, str], object] = {}  # (class, method) -> its own attribute
_LOCK = threading.Lock()


def install() -> None:
    """Wrap the DataFrame methods that take Columns so that they answer LLM Columns."""
    from pyspark.sql.group import GroupedData

    with _LOCK:
        if _ORIGINALS:
            return
        frame = _dataframe_class()
        wrappers = {(frame, m): _answering(getattr(frame, m), m == "select") for m in _METHODS}
        grouping = _grouping(frame.groupBy)
        wrappers[frame, "groupBy"] = wrappers[frame, "groupby"] = grouping
        wrappers[GroupedData, "agg"] = _grouped_agg(GroupedData.agg)
        for (cls, method), wrapper in wrappers.items():
            _ORIGINALS[cls, method] = cls.__dict__.get(method, _MISSING)
            setattr(cls, method, wrapper)


def uninstall() -> None:
    """Put PySpark's own methods back (DataFrames made meanwhile keep their answers)."""
    with _LOCK:
        for (cls, method), original in _ORIGINALS.items():
            if original is _MISSING:
                delattr(cls, method)  # it was inherited
            else:
                setattr(cls, method, original)
        _ORIGINALS.clear()


def is_installed() -> bool:
    return bool(_ORIGINALS)


# ---- private ---------------------------------------------------------------------------------


def _answering(method, rename: bool = False):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        sites = [] if is_passing_through() else sites_in([args, kwargs])
        if not sites:
            return method(self, *args, **kwargs)
        if rename:
            args = tuple(_labelled(a) for a in args)
        frame = with_answers(self, sites)
        with passing_through():
            return method(frame, *args, **kwargs).drop(*[s.name for s in sites])

    return call


def _grouping(method):
    """groupBy on the answered frame; the GroupedData remembers the frame and its keys so that
    an `agg` over LLM Columns can answer them too."""

    @functools.wraps(method)
    def call(self, *cols):
        sites = [] if is_passing_through() else sites_in([cols])
        frame = with_answers(self, sites) if sites else self
        cols = [_labelled(c) for c in cols]
        with passing_through():
            grouped = method(frame, *cols)
        grouped._llmudf_group = (frame, cols, method)
        return grouped

    return call


def _grouped_agg(method):
    @functools.wraps(method)
    def call(self, *exprs):
        sites = [] if is_passing_through() else sites_in([exprs])
        group = getattr(self, "_llmudf_group", None)
        if not sites or group is None:
            return method(self, *exprs)
        frame, cols, group_by = group
        frame = with_answers(frame, sites)
        with passing_through():
            return method(group_by(frame, *cols), *exprs)

    return call


def _labelled(value):
    """An unaliased LLM Column in select or groupBy is named after its call: `llm(Title)`."""
    if isinstance(value, list):
        return [_labelled(v) for v in value]
    site = site_of(value)
    return value if site is None else value.alias(site.label)


def _dataframe_class() -> type:
    """Classic Spark's DataFrame (Spark 4 splits it from Spark Connect's)."""
    try:
        from pyspark.sql.classic.dataframe import DataFrame
    except ImportError:  # Spark 3.5
        from pyspark.sql.dataframe import DataFrame
    return DataFrame
