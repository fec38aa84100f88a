"""The LLM functions as per-batch pandas UDFs: what plain Spark SQL calls after `register`,
and what answers, in the final query, the rows whose argument tuples have no answer yet.

Each batch is answered on its executor (deduplicated and put in prefix-sharing order there)
through the node's engine server. A batch whose instructions are all NULL (the rows found in
an answer table send NULLs) is answered NULL at once, without a server.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import FUNCTIONS
from llmudf.connectors.spark.client import task_client
from llmudf.connectors.spark.reduce import register_reduce
from llmudf.runtime.cache import open_cache
from llmudf.runtime.chunk_call import bind_chunk
from llmudf.runtime.embed import embed_array
from llmudf.runtime.executor import run_call

__all__ = ["answers_frame", "batch_udf", "embed_udf", "register"]

_SPARK_TYPES = {
    pa.string().id: "string",
    pa.bool_().id: "boolean",
    pa.float64().id: "double",
}


def register(spark, config: Config | None = None, **options) -> None:
    """Register llm, llm_filter, llm_choice, llm_score, llm_json for Spark SQL (per batch).

    >>> llmudf.spark.register(spark, max_tokens=8)                                # doctest: +SKIP
    >>> spark.sql("SELECT llm('Genre?', title) FROM movies").show()               # doctest: +SKIP
    """
    config = config or Config.from_kwargs(**options)
    if getattr(spark, "_llmudf_registered", None) == config:
        return  # the registrations cost ~0.05 s, on every `sql` call
    for name in FUNCTIONS:
        spark.udf.register(name, batch_udf(name, config))
    spark.udf.register("llm_embed", embed_udf(config))
    register_reduce(spark, config)
    spark._llmudf_registered = config


def batch_udf(name: str, config: Config):
    """The per-batch pandas UDF of `name`: (instruction, [const], *fields, [options])."""
    from pyspark.sql.functions import pandas_udf

    function = FUNCTIONS[name]

    def udf(*args: pd.Series) -> pd.Series:
        arrays = [_to_arrow(a) for a in args]
        num_rows = len(arrays[0])
        if num_rows == 0:
            return pd.Series([], dtype=object)
        call = bind_chunk(name, arrays, f"{name} (per batch)")
        if call.instruction == [None] * num_rows:  # NULL answers; no engine server is needed
            return pd.Series([None] * num_rows, dtype=object)
        cache = open_cache(config.cache_dir) if config.cache else None
        client = task_client(config)
        result = run_call(call.spec, call.instruction, call.fields, config, client, cache)
        return pd.Series(result.answers.to_pylist(), dtype=object)

    return pandas_udf(udf, returnType=_SPARK_TYPES[function.arrow_type.id])


def embed_udf(config: Config):
    """`llm_embed(text) -> array<float>` per batch (embedded on the executor, through the
    result cache; NULL for NULL)."""
    from pyspark.sql.functions import pandas_udf

    def udf(texts: pd.Series) -> pd.Series:
        vectors = embed_array(_to_arrow(texts), config, site="llm_embed (per batch)")
        return pd.Series([None if v is None else v for v in vectors.to_pylist()], dtype=object)

    return pandas_udf(udf, returnType="array<float>")


def answers_frame(spark, table: pa.Table):
    """`table` as a DataFrame: a local relation, which a join reads by broadcast without a
    job of its own."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return spark.createDataFrame(table, schema=from_arrow_schema(table.schema))


def _to_arrow(value: pd.Series | pd.DataFrame) -> pa.Array:
    """A pandas UDF argument as Arrow (a struct arrives as a DataFrame; NULL is None)."""
    if isinstance(value, pd.DataFrame):
        arrays = [pa.Array.from_pandas(value[c]) for c in value.columns]
        return pa.StructArray.from_arrays(arrays, names=[str(c) for c in value.columns])
    return pa.Array.from_pandas(value)
