"""PySpark: the LLM functions in Spark SQL and the DataFrame API, answered by the engine
server co-located on each node.

- `sql(spark, query)` rewrites the whole query (sqlglot, spark dialect) like DuckDB does:
  each call site's distinct argument tuples are planned on the driver (dedup, GGR order,
  result cache), sent in that order as a DataFrame range-partitioned by send position, so
  prompts that share prefixes meet in one partition, and answered by `mapInArrow` tasks
  that talk to their node's engine server (`FlightEngineClient`; started on first use).
- `register(spark)` registers llm, llm_filter, llm_choice, llm_score, llm_json as Arrow
  batch UDFs for plain Spark SQL (each batch deduplicated and reordered on its executor).
- `llm(...)`, `llm_filter(...)`, ... return Columns for `select` / `where` / `withColumn`,
  optimized over the whole DataFrame the same way (see llmudf.connectors.spark_frame).

A task whose server dies is retried (by the client, then by Spark): greedy answers and the
result cache make the retry give the same answers.

>>> import llmudf.spark
>>> llmudf.spark.register(spark, max_tokens=8)                                 # doctest: +SKIP
>>> query = "SELECT title FROM movies WHERE llm_filter('Kids?', title)"
>>> llmudf.spark.sql(spark, query).show()                                      # doctest: +SKIP
>>> df.select(llm("Genre?", "title", "plot").alias("genre"))                  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, replace

import pandas as pd
import pyarrow as pa
import sqlglot

from llmudf.cache import open_cache
from llmudf.client import get_client
from llmudf.config import Config
from llmudf.connectors.spark_frame import column_function
from llmudf.executor import run_call
from llmudf.functions import FUNCTIONS, bind_call, is_options
from llmudf.optimizer.callsite import fields_table
from llmudf.optimizer.rewrite import ANSWER, FOUND, QueryRewrite, UnsupportedQuery
from llmudf.paths import weights_id
from llmudf.prompt import ChatPrompt

_ANSWER_SCHEMA = "i long, text string, p int, c int, g int"
_NAMES = itertools.count(1)


class SparkClient:
    """EngineClient that answers a batch on the cluster: prompts keep their (optimized) order,
    are range-partitioned by position, and each task asks its node's engine server."""

    def __init__(self, spark, config: Config, num_partitions: int | None = None):
        self.spark = spark
        self.config = config
        self.num_partitions = num_partitions or _num_executors(spark)

    @property
    def model_id(self) -> str:
        return weights_id(self.config.model)

    def generate(self, prompts: list, params, progress=None) -> list:
        from llmudf.engine.request import Output

        if not prompts:
            return []
        parts = max(1, min(self.num_partitions, len(prompts)))
        # contiguous position ranges, one per task: range partitions by send order without a
        # shuffle or a sampling job; the prompts travel with the task's function (Spark
        # broadcasts a large one)
        answer = _answer_partition(
            self.config,
            asdict(params),
            [p.user for p in prompts],
            [p.system for p in prompts],
        )
        requests = self.spark.range(0, len(prompts), 1, parts)
        table = requests.mapInArrow(answer, _ANSWER_SCHEMA).toArrow().sort_by("i")
        if progress is not None:
            progress(table.num_rows)
        return [
            Output(str(r["i"]), r["text"], [], "stop", r["p"], r["c"], r["g"])
            for r in table.to_pylist()
        ]


def _num_executors(spark) -> int:
    """Executors now up (local mode: 1): one task each. The tasks on one node share its engine
    server, which batches all the prompts it is sent: a batch split among more tasks there
    only reaches it in separate, smaller steps."""
    block_managers = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
    return max(1, block_managers - 1)  # the driver's is one of them


def _task_client(config: Config):
    """The client of a Spark task: the node's engine server for the model (started on first
    use), unless the config names a server endpoint or an OpenAI-compatible one. Shared by
    the batches a Python worker answers."""
    if config.backend == "local":
        config = replace(config, backend="server")
    return get_client(config)


def _answer_rows(client, prompts: list, params: dict) -> list[dict]:
    """Answers as dicts of Output fields; the Flight client needs no torch in the task."""
    if hasattr(client, "generate_rows"):
        return client.generate_rows(prompts, params)
    from llmudf.engine.sampling import SamplingParams

    return [asdict(o) for o in client.generate(prompts, SamplingParams(**params))]


def _answer_partition(config: Config, params: dict, users: list, systems: list):
    schema = pa.schema(
        [("i", pa.int64()), ("text", pa.string())] + [(n, pa.int32()) for n in ("p", "c", "g")]
    )

    def answer(batches):
        client = _task_client(config)
        for batch in batches:
            ids = batch.column(0).to_pylist()
            prompts = [ChatPrompt(users[i], systems[i]) for i in ids]
            rows = _answer_rows(client, prompts, params) if prompts else []
            yield pa.RecordBatch.from_pydict(
                {
                    "i": ids,
                    "text": [r["text"] for r in rows],
                    "p": [r["num_prompt_tokens"] for r in rows],
                    "c": [r["num_cached_tokens"] for r in rows],
                    "g": [r["num_generated_tokens"] for r in rows],
                },
                schema=schema,
            )

    return answer


def sql(spark, query: str, config: Config | None = None, **options):
    """Run a Spark SQL query whose LLM calls are answered once per distinct argument tuple,
    in prefix-sharing order, on the node engine servers; returns a DataFrame.

    >>> llmudf.spark.sql(spark, "SELECT llm('Genre?', title) AS g FROM movies")  # doctest: +SKIP
    """
    config = config or Config.from_kwargs(**options)
    register(spark, config)
    try:
        rewrite = QueryRewrite(query, "spark")
    except UnsupportedQuery:
        return spark.sql(query)
    if not rewrite.sites:
        return spark.sql(query)
    if not config.rewrite or _is_nondeterministic(rewrite):
        return spark.sql(rewrite.udf_sql())
    cache = open_cache(config.cache_dir) if config.cache else None
    client = SparkClient(spark, config)

    def run_sql(text: str) -> pa.Table:
        # a later call's argument query joins the answers of the earlier ones: found rows
        # must not reach the model there either
        return spark.sql(_misses_only(sqlglot.parse_one(text, read="spark")).sql("spark")).toArrow()

    def answer(site, args: pa.Table) -> str:
        instruction, fields = site.inputs(args)
        result = run_call(site.spec, instruction, fields, config, client, cache)
        table = args.append_column(ANSWER, result.answers)
        table = table.append_column(FOUND, pa.array([True] * args.num_rows, pa.bool_()))
        name = f"__llm_answers_{next(_NAMES)}"
        # a local relation: the final query joins it by broadcast without a job of its own
        spark.createDataFrame(table, schema=_spark_schema(table)).createOrReplaceTempView(name)
        return name

    try:
        rewrite.run(run_sql, answer)
    except UnsupportedQuery:
        return spark.sql(QueryRewrite(query, "spark").udf_sql())
    return spark.sql(_misses_only(rewrite.tree).sql("spark"))


# functions whose values change on every evaluation: answers computed for the rows of one
# evaluation cannot be joined back to the rows of another, so such queries run per batch
_NONDETERMINISTIC = {
    "RAND",
    "RANDN",
    "UUID",
    "SHUFFLE",
    "MONOTONICALLY_INCREASING_ID",
    "SPARK_PARTITION_ID",
    "INPUT_FILE_NAME",
}


def _is_nondeterministic(rewrite) -> bool:
    from sqlglot import exp

    for func in rewrite.tree.find_all(exp.Func):
        name = func.name if isinstance(func, exp.Anonymous) else func.sql_name()
        if name.upper() in _NONDETERMINISTIC:
            return True
    return False


def _misses_only(tree):
    """`CASE WHEN found THEN answer ELSE <call> END`: Spark evaluates a Python UDF on every row,
    whatever the branch. The call's instruction and non-constant arguments become NULL where
    the answer was found: a NULL instruction is a NULL answer, so the per-batch UDF asks the
    model only for the argument tuples the answers miss (the source changed since the
    rewrite read it; usually none), and found rows send it NULLs, not their fields."""
    from sqlglot import exp

    # inner calls first: an outer call's arguments are copied with them
    for case in reversed(list(tree.find_all(exp.Case))):
        ifs = case.args.get("ifs") or []
        call = case.args.get("default")
        if not (len(ifs) == 1 and _is_found(ifs[0].this) and isinstance(call, exp.Anonymous)):
            continue
        found = ifs[0].this
        for i, arg in enumerate(call.expressions):
            if i == 0 or arg.find(exp.Column) is not None:  # the instruction, and any fields
                arg.replace(exp.If(this=found.copy(), true=exp.null(), false=arg.copy()))
    return tree


def _is_found(node) -> bool:
    """`__llm_i.__llm_found`, or ANY_VALUE of it in a grouped scope."""
    from sqlglot import exp

    if isinstance(node, exp.AnyValue):
        node = node.this
    return isinstance(node, exp.Column) and node.name == FOUND


def register(spark, config: Config | None = None, **options) -> None:
    """Register llm, llm_filter, llm_choice, llm_score, llm_json for Spark SQL (per batch).

    >>> llmudf.spark.register(spark, max_tokens=8)                                # doctest: +SKIP
    >>> spark.sql("SELECT llm('Genre?', title) FROM movies").show()               # doctest: +SKIP
    """
    config = config or Config.from_kwargs(**options)
    if getattr(spark, "_llmudf_registered", None) == config:
        return  # the registrations cost ~0.05 s, on every `sql` call
    for name in FUNCTIONS:
        spark.udf.register(name, _batch_udf(name, config))
    spark._llmudf_registered = config


def batch_column(site, keys: list, unless=None):
    """The per-batch UDF call of a DataFrame-API call site (`spark_frame.FrameSite`) on the
    Columns `keys`: its instruction Column first unless the instruction is a str, then its
    fields. `unless`: a boolean Column; where it is true, the instruction and fields are NULL,
    so the answer is NULL and the model is not asked (see `_misses_only`)."""
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
    return _batch_udf(site.spec.function.name, site.config)(*args)


llm = column_function("llm")
llm_filter = column_function("llm_filter")
llm_choice = column_function("llm_choice")
llm_score = column_function("llm_score")
llm_json = column_function("llm_json")


# ---- private ---------------------------------------------------------------------------------


def _batch_udf(name: str, config: Config):
    """The per-batch pandas UDF of `name`."""
    from pyspark.sql.functions import pandas_udf

    function = FUNCTIONS[name]

    def udf(*args: pd.Series) -> pd.Series:
        rest = list(args[1:])
        const = rest.pop(0).iloc[0] if function.const_arg and rest else None
        if hasattr(const, "tolist"):
            const = const.tolist()
        call_options = {}
        if len(rest) >= 2 and isinstance(rest[-1], pd.DataFrame) and len(rest[-1]):
            columns = {str(k): pa.Array.from_pandas(c).to_pylist() for k, c in rest[-1].items()}
            # a constant here: the same value on every row of the batch
            constants = {k: c[0] for k, c in columns.items() if len(set(map(repr, c))) == 1}
            if is_options(list(columns), constants, f"{name} (per batch)", from_rows=True):
                call_options = constants
                rest.pop()
        spec = bind_call(name, const, call_options, f"{name} (per batch)")
        instruction = pa.Array.from_pandas(args[0]).to_pylist()  # NULL: None, never NaN
        if all(i is None for i in instruction):  # NULL answers; no engine server is needed
            return pd.Series([None] * len(instruction), dtype=object)
        if len(set(instruction)) == 1 and instruction[0] is not None:
            instruction = instruction[0]
        fields = _fields_table(rest, len(args[0]))
        cache = open_cache(config.cache_dir) if config.cache else None
        result = run_call(spec, instruction, fields, config, _task_client(config), cache)
        return pd.Series(result.answers.to_pylist(), dtype=object)

    return pandas_udf(udf, returnType=_SPARK_TYPES[function.arrow_type.id])


_SPARK_TYPES = {
    pa.string().id: "string",
    pa.bool_().id: "boolean",
    pa.float64().id: "double",
}


def _fields_table(args: list, num_rows: int) -> pa.Table:
    names, arrays = [], []
    for i, arg in enumerate(args, 1):
        frame = arg if isinstance(arg, pd.DataFrame) else arg.to_frame(f"field{i}")
        for column in frame.columns:
            names.append(str(column))
            arrays.append(pa.Array.from_pandas(frame[column]))
    return fields_table(names, arrays, num_rows)


def _spark_schema(table: pa.Table):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(table.schema)
