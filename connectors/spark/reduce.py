"""`llm_reduce` in Spark: the LLM aggregate in Spark SQL and the DataFrame API.

- `llmudf.spark.sql(spark, query)` and the DataFrame function `llm_reduce(instruction,
  *fields)` collect each group's rows (`collect_list(struct(...))`) for `__llm_reduce_lists`,
  a pandas UDF that answers every group of its Arrow batch together (one batch per level of
  the hierarchy) on the executor, through the node's engine server.
- Plain `spark.sql` after `register(spark)`: `llm_reduce` is a grouped-aggregate pandas UDF
  that answers one group per call (Spark hands it one group at a time).

Either way the rows enter the prompt in an order derived from their content, so 1 or 4
partitions, and any plan, give the same answer.

>>> from llmudf.spark import llm_reduce
>>> movies.groupBy("Genre").agg(llm_reduce("What do they share?", "Title").alias("s"))
... # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings

import pandas as pd
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.reduce import bind_reduce, reduce_spec
from llmudf.connectors.spark.client import task_client
from llmudf.optimizer.reduce_sql import REDUCE_LISTS
from llmudf.runtime.cache import open_cache
from llmudf.runtime.chunk_call import bind_chunk
from llmudf.runtime.reduce import reduce_lists, run_reduce

__all__ = ["grouped_reduce_udf", "llm_reduce", "reduce_lists_udf", "register_reduce"]


def register_reduce(spark, config: Config) -> None:
    """`llm_reduce` (one group per call) and `__llm_reduce_lists` for Spark SQL."""
    spark.udf.register("llm_reduce", grouped_reduce_udf(config))
    spark.udf.register(REDUCE_LISTS, reduce_lists_udf(config))


def llm_reduce(instruction: str, *fields, config: Config | None = None, **options):
    """`llm_reduce(instruction, *columns, **options)` as an aggregate Column for `agg` (or a
    `select` over the whole frame): one answer per group. Columns by name or as Columns;
    options as keywords (max_tokens, temperature, ...).

    >>> df.groupBy("Genre").agg(llm_reduce("Summarize.", "Title", "Plot", max_tokens=64))
    ... # doctest: +SKIP
    """
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    site = "llm_reduce(...)"
    if not isinstance(instruction, str):
        raise TypeError(f"{site}: the instruction must be a str, got {instruction!r}")
    if not fields:
        raise TypeError(f"{site}: pass at least one field (a column name or a Column)")
    bind_reduce(options, site)  # a bad option fails here, not in a task
    structs = []
    for i, field in enumerate(fields, 1):
        if isinstance(field, str):
            structs.append(F.struct(F.col(field).alias(field)))
        elif isinstance(field, Column):
            structs.append(F.struct(field.alias(_field_name(field, i))))
        else:
            raise TypeError(f"{site}: fields are column names or Columns, got {field!r}")
    if options:
        structs.append(F.struct(*[F.lit(v).alias(k) for k, v in sorted(options.items())]))
    element = F.struct(*[s.alias(f"a{i}") for i, s in enumerate(structs, 1)])
    udf = reduce_lists_udf(config or Config())
    return udf(F.lit(instruction), F.collect_list(element))


def reduce_lists_udf(config: Config):
    """`__llm_reduce_lists(instruction, rows)`: rows = an array of structs per group."""
    from pyspark.sql.functions import pandas_udf

    def udf(instructions: pd.Series, lists: pd.Series) -> pd.Series:
        if len(lists) == 0:
            return pd.Series([], dtype=object)
        texts = pa.array(instructions.tolist(), pa.string())
        rows = pa.array([None if x is None else [_plain(e) for e in x] for x in lists])
        cache = open_cache(config.cache_dir) if config.cache else None
        site = "llm_reduce (per batch)"
        result = reduce_lists(texts, rows, config, cache, site, client_for=task_client)
        return pd.Series(result.answers, dtype=object)

    return pandas_udf(udf, returnType="string")


def grouped_reduce_udf(config: Config):
    """`llm_reduce(instruction, field, ...)` as a grouped-aggregate pandas UDF."""
    from pyspark.sql.functions import PandasUDFType, pandas_udf

    def udf(*args) -> str | None:
        arrays = [_to_arrow(a) for a in args]
        if len(arrays[0]) == 0:
            return None
        site = "llm_reduce (per group)"
        call = bind_chunk("llm", arrays, site)
        spec = reduce_spec(call.spec)
        instruction = call.instruction
        if not isinstance(instruction, str):
            raise ValueError(f"{site}: the instruction must be the same on every row of a group")
        cache = open_cache(config.cache_dir) if config.cache else None
        client = task_client(spec.config(config))
        return run_reduce(spec, instruction, [call.fields], config, client, cache).answers[0]

    with warnings.catch_warnings():
        # type hints cannot say "any number of arguments": the function type says it
        warnings.simplefilter("ignore", UserWarning)
        return pandas_udf(udf, returnType="string", functionType=PandasUDFType.GROUPED_AGG)


# ---- private ---------------------------------------------------------------------------------


def _plain(value):
    """A struct value from a pandas UDF (dicts of numpy scalars) as plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _to_arrow(value: pd.Series | pd.DataFrame) -> pa.Array:
    """A pandas UDF argument as Arrow (a struct arrives as a DataFrame)."""
    if isinstance(value, pd.DataFrame):
        arrays = [pa.Array.from_pandas(value[c]) for c in value.columns]
        return pa.StructArray.from_arrays(arrays, names=[str(c) for c in value.columns])
    return pa.Array.from_pandas(value)


def _field_name(column, position: int) -> str:
    """A Column field's name in the prompt: its alias or column name, else field<i>."""
    match = re.fullmatch(r"Column<'(?:.* AS )?`?([A-Za-z_][A-Za-z0-9_]*)`?'>", str(column))
    return match.group(1) if match else f"field{position}"
