"""Spark `local[2]`: movies filter and projection queries, a plain pandas UDF vs llmudf.

(a) baseline: a pandas UDF that sends every row of each Arrow batch to the node's engine
    server in the original row order, no dedup;
(b) llmudf: `llmudf.spark.sql` (whole-query rewrite: dedup, prefix-sharing order, range
    partitions, mapInArrow to the same kind of node server).
Each side gets a fresh engine server (no prefix cache carried over), warmed before timing.
Prints the ratios and ends with one JSON line.

    python bench/spark.py --rows 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import pandas as pd

from llmudf import paths
from llmudf.config import Config
from llmudf.functions import bind_call
from llmudf.prompt import ChatPrompt, render_user_message

QUERIES = {
    "filter": (
        "llm_filter",
        "Is a movie of this genre and rating suitable for young children?",
        ["Genre", "Rating"],
    ),
    "projection": ("llm", "Name the main audience of this kind of movie.", ["Genre", "Rating"]),
}


def baseline_udf(name: str, instruction: str, columns: list[str], config: Config):
    """The plain way: one prompt per row, in row order, per Arrow batch."""
    from llmudf.engine.sampling import SamplingParams
    from pyspark.sql.functions import pandas_udf

    spec = bind_call(name)
    decoding = {k: v for k, v in spec.decoding(config).items() if k != "json_schema"}
    params = SamplingParams(**decoding)
    text = spec.instruction(instruction)
    spark_type = {"llm_filter": "boolean", "llm": "string"}[name]

    def udf(_instruction: pd.Series, *cols: pd.Series) -> pd.Series:
        from llmudf.engine.flight_client import FlightEngineClient

        prompts = [
            ChatPrompt(render_user_message(text, list(zip(columns, values, strict=True))))
            for values in zip(*[c.tolist() for c in cols], strict=True)
        ]
        client = FlightEngineClient(model=config.model, engine=config.engine)
        outs = client.generate(prompts, params)
        return pd.Series([spec.parse(o.text) for o in outs], dtype=object)

    return pandas_udf(udf, returnType=spark_type)


def fresh_server(config: Config) -> None:
    """Stop this node's server (if any) and start a warm new one."""
    from llmudf.engine.flight_client import FlightEngineClient, node_server
    from llmudf.engine.sampling import SamplingParams

    for state in (paths.cache_dir() / "servers").glob("*.json"):
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
        state.unlink(missing_ok=True)
    node_server(config.model, config.engine)
    client = FlightEngineClient(model=config.model, engine=config.engine)
    client.generate([ChatPrompt("warm up")], SamplingParams(max_tokens=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("LLMUDF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "llmudf-bench"))

    from pyspark.sql import SparkSession

    import llmudf.spark as lspark

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    con = sqlite3.connect(paths.movies_db())
    movies = pd.read_sql(
        f"SELECT ID, Title, Genre, Rating FROM omdb WHERE Genre IS NOT NULL "
        f"ORDER BY ID LIMIT {args.rows}",
        con,
    )
    spark.createDataFrame(movies).repartition(2).createOrReplaceTempView("movies")
    config = Config(
        model=args.model,
        engine={"device": "cpu"},
        max_tokens=args.max_tokens,
        cache=False,
        progress=False,
    )
    report: dict = {"rows": len(movies)}
    identical = True
    for label, (name, instruction, columns) in QUERIES.items():
        spark.udf.register(f"plain_{name}", baseline_udf(name, instruction, columns, config))
        args_sql = ", ".join(columns)
        plain_sql = f"SELECT ID, plain_{name}('{instruction}', {args_sql}) AS a FROM movies"
        fields = ", ".join(columns)
        ours_sql = f"SELECT ID, {name}('{instruction}', {fields}) AS a FROM movies"

        fresh_server(config)
        start = time.perf_counter()
        plain = {r.ID: r.a for r in spark.sql(plain_sql).collect()}
        plain_s = time.perf_counter() - start

        fresh_server(config)
        start = time.perf_counter()
        ours = {r.ID: r.a for r in lspark.sql(spark, ours_sql, config=config).collect()}
        ours_s = time.perf_counter() - start

        same = plain == ours
        identical &= same
        speedup = plain_s / ours_s
        num_distinct = len(movies[columns].drop_duplicates())
        print(
            f"{label:<11} rows={len(movies)} distinct={num_distinct} plain={plain_s:.1f}s "
            f"llmudf={ours_s:.1f}s speedup={speedup:.2f}x identical={same}"
        )
        report[f"plain_{label}_s"] = round(plain_s, 2)
        report[f"llmudf_{label}_s"] = round(ours_s, 2)
        report[f"speedup_{label}"] = round(speedup, 2)
    report["identical"] = identical
    spark.stop()
    for state in (paths.cache_dir() / "servers").glob("*.json"):
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.kill(json.loads(state.read_text())["pid"], signal.SIGTERM)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
