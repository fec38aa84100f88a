"""`sql(spark, query)`: Spark SQL with the whole-query rewrite, as in DuckDB.

The shared plan (`QueryRewrite(query, "spark")`, driven by `llmudf.runtime.query_driver`) runs its
probes and argument queries as Spark SQL; each call site's distinct argument tuples are
planned on the driver (dedup, GGR order, result cache) and answered on the cluster by
`SparkClient`; each answer table becomes a temp view (a local relation, joined by
broadcast) for the later stages and the final query. A query the rewrite does not cover
(one with a non-deterministic function, a call over an aggregate, ...) runs per batch.
"""

from __future__ import annotations

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.connectors.spark.client import SparkClient
from llmudf.connectors.spark.udf import answers_frame, register
from llmudf.optimizer.reduce_sql import has_reduce, rewrite_reduce
from llmudf.optimizer.rewrite import AnswerStep, QueryRewrite, UnsupportedQuery
from llmudf.runtime.cache import open_cache
from llmudf.runtime.executor import run_call
from llmudf.runtime.query_driver import CallInput, drive

__all__ = ["sql"]


def sql(spark, query: str, config: Config | None = None, **options):
    """Run a Spark SQL query whose LLM calls are answered once per distinct argument tuple,
    in prefix-sharing order, on the node engine servers; returns a DataFrame.

    >>> llmudf.spark.sql(spark, "SELECT llm('Genre?', title) AS g FROM movies")  # doctest: +SKIP
    """
    config = config or Config.from_kwargs(**options)
    register(spark, config)
    if has_reduce(query):  # checked, and each group's rows collected for one batch
        query = rewrite_reduce(query, "spark")
    try:
        rewrite = QueryRewrite(query, "spark")
    except UnsupportedQuery:
        return spark.sql(query)
    if not rewrite.sites:
        return spark.sql(query)
    if not config.rewrite:
        return spark.sql(rewrite.udf_sql())
    cache = open_cache(config.cache_dir) if config.cache else None
    client = SparkClient(spark, config)
    views = []

    def run_sql(text: str) -> pa.Table:
        return spark.sql(text).toArrow()

    def answer(step: AnswerStep, call: CallInput) -> pa.Array:
        spec = step.site.spec
        return run_call(spec, call.instruction, call.fields, config, client, cache).answers

    def bind(name: str, table: pa.Table) -> None:
        answers_frame(spark, table).createOrReplaceTempView(name)
        views.append(name)

    try:
        return spark.sql(drive(rewrite, run_sql, answer, bind, config=config).sql)
    except UnsupportedQuery:
        return spark.sql(rewrite.udf_sql())
    finally:
        # the DataFrame holds the answers it read (its plan was analyzed above); the
        # session's catalog need not
        for name in views:
            spark.catalog.dropTempView(name)
