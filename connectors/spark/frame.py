"""The PySpark DataFrame API: `llm(...)`, `llm_filter(...)`, ... return Columns that stand for
the answers of an LLM call site, optimized over the whole DataFrame like `llmudf.spark.sql`.

A call's Column is `F.col("__llmudf_answer_<n>")`: a reference to a column no DataFrame has
yet, under a name unique to the call site, which is recorded under that name. The DataFrame
methods that take Columns (see `methods.py`) first answer every call site their Columns use,
over the whole DataFrame they are called on: each distinct argument tuple once, in the
optimizer's order, range-partitioned to the node engine servers (`SparkClient`), through the
result cache. The answers are joined back (a broadcast join, so the DataFrame's row order is
kept) and the method then runs as written: an LLM Column can sit anywhere inside an
expression (`F.upper(llm(...))`, `llm_filter(...) & (col > 1)`).

How the sites a Column uses are found. PySpark has no public way to walk a Column's
expression, so the generated names are looked up in the expression's SQL text, which every
PySpark version renders with the column names it references; only whole generated names are
matched (against the registry), nothing of the text's layout. The alternatives: the JVM
expression tree behind `Column._jc` is private, differs between Spark 3.5 (`Expression`) and
4 (`ColumnNode`) and costs a py4j round trip per node on every DataFrame method call; asking
Spark's analyzer (call the method, catch `UNRESOLVED_COLUMN`) logs an ERROR with a stack
trace and costs ~0.1 s per miss. An unaliased LLM Column in `select` is recognized by the
Column object itself (it carries its site's name), not by its text. A Column field's name in
the prompt is read from its text (`F.col("Title")`, `expr.alias("g")`); any other Column is
`field<i>`, the same on every path.

The sites live in a registry of the newest `MAX_SITES` calls: a Column cannot say when it is
gone (the Columns derived from it are new objects that hold no reference to it), so weak
references would lose sites still in use. A Column whose site was forgotten fails naming it.

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
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from llmudf.calls.config import Config
from llmudf.calls.functions import CallSpec, LLMCallError, bind_call
from llmudf.connectors.spark.client import SparkClient
from llmudf.connectors.spark.udf import answers_frame, batch_udf
from llmudf.optimizer.callsite import fields_table
from llmudf.runtime.cache import open_cache
from llmudf.runtime.executor import run_call
from llmudf.runtime.query_driver import answer_table

__all__ = ["MAX_SITES", "FrameSite", "column_function", "sites_in", "with_answers"]

MAX_SITES = 4096
_PREFIX = "__llmudf_answer_"
_NAME = re.compile(rf"{_PREFIX}(\d+)")
# on the Column `llm(...)` returns: its site's name (a Column answers other attribute names,
# unless they start with "__", with a field of itself)
SITE_ATTRIBUTE = "__llmudf_site"
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


class _Registry:
    """The newest `capacity` call sites, by answer-column name and by call signature."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._sites: OrderedDict[str, tuple[str, FrameSite]] = OrderedDict()
        self._names: dict[str, str] = {}  # signature -> name
        self._num_made = 0
        self._lock = threading.Lock()

    def add(self, signature: str, make) -> FrameSite:
        """The site of `signature`; `make(name)` builds it the first time."""
        with self._lock:
            name = self._names.get(signature)
            if name is None:
                self._num_made += 1
                name = f"{_PREFIX}{self._num_made}"
                self._names[signature] = name
                self._sites[name] = (signature, make(name))
                if len(self._sites) > self.capacity:
                    _old, (old_signature, _site) = self._sites.popitem(last=False)
                    del self._names[old_signature]
            self._sites.move_to_end(name)
            return self._sites[name][1]

    def get(self, name: str) -> FrameSite | None:
        """The site of `name`; None for a name this process did not make; LLMCallError for
        one it made and has forgotten."""
        with self._lock:
            entry = self._sites.get(name)
            if entry is not None:
                self._sites.move_to_end(name)
                return entry[1]
            if int(name.removeprefix(_PREFIX)) <= self._num_made:
                raise LLMCallError(
                    f"{name}: this LLM Column was made before the newest {self.capacity} LLM "
                    "calls and is forgotten; make it again"
                )
            return None


_SITES = _Registry(MAX_SITES)


def column_function(name: str):
    """The DataFrame-API function `name` (llm, llm_filter, ...): returns its answer Column."""

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
        # the same call written twice is one site (a Column's text is its expression)
        signature = repr((name, str(instruction), named, const, sorted(options.items()), config))
        site = _SITES.add(
            signature,
            lambda answer_name: FrameSite(
                name=answer_name,
                label=f"{name}({', '.join(n for n, _c in named)})",
                spec=spec,
                instruction=instruction,
                fields=tuple(named),
                const=const,
                options=tuple(sorted(options.items())),
                config=config or Config(),
            ),
        )
        answer = F.col(site.name)
        setattr(answer, SITE_ATTRIBUTE, site.name)
        return answer

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


def sites_in(values) -> list[FrameSite]:
    """The call sites the Columns among `values` (nested in lists, tuples, dicts) use, the
    ones they depend on first."""
    from pyspark.sql import Column

    found: dict[str, FrameSite] = {}

    def visit(value) -> None:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list | tuple):
            for item in value:
                visit(item)
            return
        if not isinstance(value, Column):
            return
        for match in _NAME.finditer(str(value)):
            name = match.group(0)
            site = None if name in found else _SITES.get(name)
            if site is not None:
                visit(site.key_columns())
                found[name] = site

    visit(list(values))
    return list(found.values())


def site_of(value) -> FrameSite | None:
    """The site of an LLM Column exactly as `llm(...)` returned it (not derived from it)."""
    name = getattr(value, SITE_ATTRIBUTE, None)
    return None if name is None else _SITES.get(name)


def with_answers(frame, sites: list[FrameSite]):
    """`frame` plus one answer column per site (inner calls first)."""
    with passing_through():
        for site in sites:
            frame = _join_answers(frame, site)
    return frame


@contextlib.contextmanager
def passing_through():
    """The patched methods act as the originals inside (our own calls, and a DataFrame method
    that calls another, such as `where` calling `filter`)."""
    saved = getattr(_ANSWERING, "active", False)
    _ANSWERING.active = True
    try:
        yield
    finally:
        _ANSWERING.active = saved


def is_passing_through() -> bool:
    return getattr(_ANSWERING, "active", False)


def batch_column(site: FrameSite, keys: list, unless=None):
    """The per-batch UDF call of `site` on the Columns `keys` (its instruction Column first
    unless the instruction is a str, then its fields). `unless`: a boolean Column; where it
    is true, the instruction and fields are NULL, so the answer is NULL and the model is not
    asked (the DataFrame twin of the rewrite's fallback call)."""
    from pyspark.sql import functions as F

    keys = list(keys)
    instruction = F.lit(site.instruction) if isinstance(site.instruction, str) else keys.pop(0)
    args = [instruction]
    if site.const is not None:
        const = site.const
        args.append(F.lit(const if isinstance(const, str) else list(const)))
    if site.fields:
        names = [name for name, _column in site.fields]
        args.append(F.struct(*[c.alias(n) for c, n in zip(keys, names, strict=True)]))
    if unless is not None:  # CASE WHEN unless THEN NULL ELSE arg END: a NULL `unless` keeps arg
        args[0] = F.when(unless, F.lit(None)).otherwise(instruction)
        if site.fields:
            args[-1] = F.when(unless, F.lit(None)).otherwise(args[-1])
    if site.options:
        args.append(F.struct(*[F.lit(v).alias(k) for k, v in site.options]))
    return batch_udf(site.spec.function.name, site.config)(*args)


# ---- private ---------------------------------------------------------------------------------


def _join_answers(frame, site: FrameSite):
    from pyspark.sql import functions as F

    config = site.config
    if not config.rewrite:
        return frame.withColumn(site.name, batch_column(site, site.key_columns()))
    keys = [f"{site.name}_k{j}" for j in range(len(site.key_columns()))]
    args = frame.select(*[c.alias(k) for c, k in zip(site.key_columns(), keys, strict=True)])
    table = args.distinct().toArrow()
    columns = iter(table.columns)
    instruction = site.instruction
    if not isinstance(instruction, str):
        instruction = next(columns).to_pylist()
    names = [name for name, _column in site.fields]
    fields = fields_table(names, [next(columns).combine_chunks() for _ in names], table.num_rows)
    cache = open_cache(config.cache_dir) if config.cache else None
    client = SparkClient(frame.sparkSession, config)
    result = run_call(site.spec, instruction, fields, config, client, cache)
    found = f"{site.name}_found"
    sides = [f"{k}_a" for k in keys]
    # a local relation, joined by broadcast without a job of its own; the left join keeps
    # the frame's row order
    answers = answers_frame(frame.sparkSession, answer_table(table, result.answers))
    answers = answers.toDF(*sides, site.name, found)
    on = [c.eqNullSafe(F.col(a)) for c, a in zip(site.key_columns(), sides, strict=True)]
    frame = frame.join(F.broadcast(answers), on=on or F.lit(True), how="left")
    # tuples the source did not hold when it was read above: answered per batch, lazily
    miss = batch_column(site, site.key_columns(), unless=F.col(found))
    answer = F.when(F.col(found), F.col(site.name)).otherwise(miss)
    return frame.withColumn(site.name, answer).drop(*sides, found)


def _field_name(column, position: int) -> str:
    """A Column field's name in the prompt: its alias or column name, else field<i>."""
    match = re.fullmatch(r"Column<'(?:.* AS )?`?([A-Za-z_][A-Za-z0-9_]*)`?'>", str(column))
    return match.group(1) if match else f"field{position}"
