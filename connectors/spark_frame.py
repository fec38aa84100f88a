"""The PySpark DataFrame API: `llm(...)`, `llm_filter(...)`, ... return Columns that stand for
the answers of an LLM call site, optimized over the whole DataFrame like `llmudf.spark.sql`.

A call's Column names its answer column. The DataFrame methods that take Columns (select,
where / filter, withColumn / withColumns, orderBy / sort, groupBy(...).agg, agg) first answer
every call site their Columns use, over the whole DataFrame they are called on: each distinct
argument tuple once, in the optimizer's order, range-partitioned to the node engine servers
(`SparkClient`), through the result cache. The answers are joined back (a broadcast join, so
the DataFrame's row order is kept), and the method then runs as written: an LLM Column can
sit anywhere inside an expression (`F.upper(llm(...))`, `llm_filter(...) & (col > 1)`).

The LLM work happens when the method is called, as with `llmudf.spark.sql`; actions then read
the answers. Argument tuples that appear later (the source changed) are answered per batch
when the action runs, so no row is left without its answer. With `Config(rewrite=False)`
the calls are answered per Arrow batch instead, when an action runs.

>>> from llmudf.spark import llm, llm_filter
>>> kids = movies.where(llm_filter("Is it suitable for kids?", "Title", "Genre"))  # doctest: +SKIP
>>> kids.select("Title", llm("One-word mood?", "Title").alias("mood")).show()   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import threading
from dataclasses import dataclass

import pyarrow as pa

from llmudf.cache import open_cache
from llmudf.config import Config
from llmudf.executor import run_call
from llmudf.functions import CallSpec, bind_call
from llmudf.optimizer.callsite import fields_table

_PREFIX = "__llmudf_answer_"
_NAME = re.compile(rf"{_PREFIX}\d+")
_NUMBERS = itertools.count(1)
_ANSWERING = threading.local()  # set while a site is answered: the patched methods pass through


@dataclass(frozen=True)
class FrameSite:
    """One LLM call of the DataFrame API: answered into the column `name`."""

    name: str
    label: str  # the output name of an unaliased call in select: "llm(Title, Genre)"
    spec: CallSpec
    instruction: object  # a str, or a Column with one instruction per row
    fields: tuple  # ((field name, Column), ...)
    const: object  # choices / schema, as given
    options: tuple  # ((option, value), ...)
    config: Config

    def key_columns(self) -> list:
        keys = [] if isinstance(self.instruction, str) else [self.instruction]
        return keys + [column for _name, column in self.fields]

    def inputs(self, table):
        """(instruction, fields table) from the distinct argument tuples of `key_columns`."""
        columns = iter(table.columns)
        instruction = self.instruction
        if not isinstance(instruction, str):
            instruction = next(columns).to_pylist()
        names = [name for name, _column in self.fields]
        arrays = [next(columns).combine_chunks() for _name in names]
        return instruction, fields_table(names, arrays, table.num_rows)


_SITES: dict[str, FrameSite] = {}
_SIGNATURES: dict[str, str] = {}  # repr of a call's arguments -> its site's name


def column_function(name: str):
    """The DataFrame-API function `name` (llm, llm_filter, ...): returns its answer Column.
    Installs the DataFrame methods that answer such Columns (before any call: a bound method
    such as `df.select` is looked up before its arguments are made)."""
    install()

    def column(instruction, *fields, choices=None, schema=None, config=None, **options):
        from pyspark.sql import Column
        from pyspark.sql import functions as F

        if not isinstance(instruction, str | Column):
            raise TypeError(
                f"{name}: the instruction must be a str or a Column, got {instruction!r}"
            )
        const = choices if choices is not None else schema
        spec = bind_call(name, const, options, f"{name}(...)")
        named = []
        for i, field in enumerate(fields, 1):
            if isinstance(field, str):
                named.append((field, F.col(field)))
            elif isinstance(field, Column):
                named.append((_field_name(field, i), field))
            else:
                raise TypeError(f"{name}: fields are column names or Columns, got {field!r}")
        signature = repr((name, str(instruction), named, const, sorted(options.items()), config))
        if signature not in _SIGNATURES:  # the same call written twice is one site
            site = FrameSite(
                name=f"{_PREFIX}{next(_NUMBERS)}",
                label=f"{name}({', '.join(n for n, _c in named)})",
                spec=spec,
                instruction=instruction,
                fields=tuple(named),
                const=const,
                options=tuple(sorted(options.items())),
                config=config or Config(),
            )
            _SITES[site.name] = site
            _SIGNATURES[signature] = site.name
        return F.col(_SIGNATURES[signature])

    column.__name__ = name
    column.__doc__ = (
        f"`{name}(instruction, *columns, **options)` as a Spark Column (columns by name or as "
        f"Columns; `choices=` for llm_choice, `schema=` for llm_json; options such as "
        f"max_tokens=8; `config=` a `llmudf.Config`). Use it in select, where / filter, "
        f"withColumn(s), orderBy / sort, groupBy(...).agg or agg; elsewhere add it with "
        f"withColumn first.\n\n"
        f'>>> df.where({name}("Is it a comedy?", "title", "genre"))   # doctest: +SKIP'
    )
    return column


def with_answers(frame, sites: list[FrameSite]):
    """`frame` plus one answer column per site (inner calls first)."""
    for site in sites:
        frame = _answer_site(frame, site)
    return frame


def sites_in(values) -> list[FrameSite]:
    """The call sites the Columns among `values` use, the ones they depend on first."""
    found: dict[str, FrameSite] = {}

    def visit(value) -> None:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list | tuple):
            for item in value:
                visit(item)
            return
        if not _is_column(value):
            return
        for name in _NAME.findall(str(value)):
            site = _SITES.get(name)
            if site is None or name in found:
                continue
            visit(site.key_columns())
            found[name] = site

    visit(list(values))
    return list(found.values())


def install() -> None:
    """Make the DataFrame methods that take Columns answer the LLM Columns among them."""
    from pyspark.sql.group import GroupedData

    for cls in _dataframe_classes():
        if cls.__dict__.get("_llmudf_installed"):
            continue
        for method in ("select", "where", "filter", "withColumn", "withColumns", "orderBy"):
            setattr(cls, method, _answering(getattr(cls, method), rename=method == "select"))
        cls.sort = _answering(cls.sort)
        cls.agg = _answering(cls.agg)
        cls.groupBy = cls.groupby = _grouping(cls.groupBy)
        cls._llmudf_installed = True
    if not GroupedData.__dict__.get("_llmudf_installed"):
        GroupedData.agg = _grouped_agg(GroupedData.agg)
        GroupedData._llmudf_installed = True


# ---- private ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _passing_through():
    """The patched methods act as the originals inside (our own calls, and a DataFrame method
    that calls another, such as `where` calling `filter`)."""
    saved = getattr(_ANSWERING, "active", False)
    _ANSWERING.active = True
    try:
        yield
    finally:
        _ANSWERING.active = saved


def _is_passing_through() -> bool:
    return getattr(_ANSWERING, "active", False)


def _answer_site(frame, site: FrameSite):
    with _passing_through():
        return _join_answers(frame, site)


def _join_answers(frame, site: FrameSite):
    from pyspark.sql import functions as F

    from llmudf.connectors.spark import SparkClient, _spark_schema, batch_column

    config = site.config
    keys = [f"{site.name}_k{j}" for j in range(len(site.key_columns()))]
    if not config.rewrite:
        return frame.withColumn(site.name, batch_column(site, site.key_columns()))
    spark = frame.sparkSession
    args = frame.select(*[c.alias(k) for c, k in zip(site.key_columns(), keys, strict=True)])
    args = args.distinct()
    table = args.toArrow()
    instruction, fields = site.inputs(table)
    cache = open_cache(config.cache_dir) if config.cache else None
    result = run_call(site.spec, instruction, fields, config, SparkClient(spark, config), cache)
    found = f"{site.name}_found"
    table = table.append_column(site.name, result.answers)
    table = table.append_column(found, pa.array([True] * table.num_rows, pa.bool_()))
    sides = [f"{k}_a" for k in keys]
    # a local relation, joined by broadcast without a job of its own; the left join keeps
    # the frame's row order
    answers = spark.createDataFrame(table, schema=_spark_schema(table)).toDF(
        *sides, site.name, found
    )
    on = [c.eqNullSafe(F.col(a)) for c, a in zip(site.key_columns(), sides, strict=True)]
    frame = frame.join(F.broadcast(answers), on=on or F.lit(True), how="left")
    # tuples the source did not hold when it was read above: answered per batch, lazily
    miss = batch_column(site, site.key_columns(), unless=F.col(found))
    answer = F.when(F.col(found), F.col(site.name)).otherwise(miss)
    return frame.withColumn(site.name, answer).drop(*sides, found)


def _answering(method, rename: bool = False):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        sites = [] if _is_passing_through() else sites_in([args, kwargs])
        if not sites:
            return method(self, *args, **kwargs)
        if rename:
            args = tuple(_labelled(a) for a in args)
        frame = with_answers(self, sites)
        with _passing_through():
            return method(frame, *args, **kwargs).drop(*[s.name for s in sites])

    return call


def _grouping(method):
    """groupBy on the answered frame; the GroupedData remembers the frame and its keys so that
    an `agg` over LLM Columns can answer them too."""

    @functools.wraps(method)
    def call(self, *cols):
        sites = [] if _is_passing_through() else sites_in([cols])
        frame = with_answers(self, sites) if sites else self
        cols = [_labelled(c) for c in cols]
        with _passing_through():
            grouped = method(frame, *cols)
        grouped._llmudf_group = (frame, cols, method)
        return grouped

    return call


def _grouped_agg(method):
    @functools.wraps(method)
    def call(self, *exprs):
        sites = [] if _is_passing_through() else sites_in([exprs])
        group = getattr(self, "_llmudf_group", None)
        if not sites or group is None:
            return method(self, *exprs)
        frame, cols, group_by = group
        frame = with_answers(frame, sites)
        with _passing_through():
            return method(group_by(frame, *cols), *exprs)

    return call


def _labelled(value):
    """An unaliased LLM Column in select is named after its call, e.g. `llm(Title)`."""
    if isinstance(value, list):
        return [_labelled(v) for v in value]
    if _is_column(value):
        match = re.fullmatch(rf"Column<'({_PREFIX}\d+)'>", str(value))
        if match and match.group(1) in _SITES:
            return value.alias(_SITES[match.group(1)].label)
    return value


def _field_name(column, position: int) -> str:
    """A Column field's name in the prompt: its alias or column name, else field<i>."""
    match = re.fullmatch(r"Column<'(?:.* AS )?`?([A-Za-z_][A-Za-z0-9_]*)`?'>", str(column))
    return match.group(1) if match else f"field{position}"


def _is_column(value) -> bool:
    from pyspark.sql import Column

    return isinstance(value, Column)


def _dataframe_classes() -> list:
    """Classic Spark's DataFrame (Spark Connect's is not covered yet: untested here)."""
    from pyspark.sql.classic.dataframe import DataFrame

    return [DataFrame]
