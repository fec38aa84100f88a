"""PySpark: the LLM functions in Spark SQL and the DataFrame API, answered by the engine
server co-located on each node. One connector in five modules, each importing only those
listed before it:

- `client.py`: `SparkClient` sends a planned batch, range-partitioned by send position (so
  prompts that share prefixes meet in one partition), to `mapInArrow` tasks that talk to
  their node's engine server (`FlightEngineClient`; started on first use).
- `udf.py`: `register(spark)` registers llm, llm_filter, llm_choice, llm_score, llm_json as
  per-batch pandas UDFs for plain Spark SQL (each batch deduplicated and reordered on its
  executor).
- `sql.py`: `sql(spark, query)` rewrites the whole query like DuckDB does (the shared plan of
  `llmudf.optimizer.rewrite`, driven by `llmudf.runtime.query_driver`).
- `frame.py`: `llm(...)`, `llm_filter(...)`, ... return Columns for `select` / `where` /
  `withColumn` / ..., optimized over the whole DataFrame the same way.
- `semantic.py`: `llm_embed(column)` and `sem_join(left, right, instruction, left_on,
  right_on)`, the semantic join with embedding blocking (the SQL twin: `JOIN ... ON
  llm_filter(...)` through `sql`).
- `reduce.py`: `llm_reduce(instruction, *fields)`, the LLM aggregate (a Column for `agg`),
  and its Spark SQL functions.
- `methods.py`: the DataFrame methods that answer those Columns. Importing this package
  installs them (`install()`; `uninstall()` puts PySpark's own back).

>>> import llmudf.spark
>>> llmudf.spark.register(spark, max_tokens=8)                                 # doctest: +SKIP
>>> query = "SELECT title FROM movies WHERE llm_filter('Kids?', title)"
>>> llmudf.spark.sql(spark, query).show()                                      # doctest: +SKIP
>>> df.select(llm("Genre?", "title", "plot").alias("genre"))                  # doctest: +SKIP
"""

from llmudf.connectors.spark.client import SparkClient
from llmudf.connectors.spark.frame import column_function
from llmudf.connectors.spark.methods import install, is_installed, uninstall
from llmudf.connectors.spark.reduce import llm_reduce
from llmudf.connectors.spark.semantic import llm_embed, sem_join
from llmudf.connectors.spark.sql import sql
from llmudf.connectors.spark.udf import register

__all__ = [
    "SparkClient",
    "install",
    "is_installed",
    "llm",
    "llm_choice",
    "llm_embed",
    "llm_filter",
    "llm_json",
    "llm_reduce",
    "llm_score",
    "register",
    "sem_join",
    "sql",
    "uninstall",
]

llm = column_function("llm")
llm_filter = column_function("llm_filter")
llm_choice = column_function("llm_choice")
llm_score = column_function("llm_score")
llm_json = column_function("llm_json")

install()
