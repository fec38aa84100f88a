"""Spark `local[2]`: the movies filter and projection queries of bench/query.py, in Spark SQL
and in the DataFrame API, a plain pandas UDF against llmudf's whole-query path, in one run,
result cache off.

(a) plain: the same SQL through the per-batch pandas UDFs with dedup and row reordering off,
    so every row of each Arrow batch is sent, in the original row order, to the node's
    engine server (whose prefix cache is on, as in any modern engine);
(b) llmudf: `llmudf.spark.sql` (whole-query rewrite: each distinct prompt once, in
    prefix-sharing order, to the same kind of node server), and the same queries written
    with the DataFrame API (`where(llm_filter(...))`, `select(llm(...))`), optimized over
    the whole DataFrame the same way.
Both sides run the same engine server setup; each query on each side gets a fresh server
(no prefix cache carried over), warmed before timing, after one untimed run of every query
on both sides over 10 rows cached and partitioned like the timed table (Spark's first-run
costs: code generation for the same plans, Python workers). The questions are about
categorical columns (300 top movies: 59 countries), the common case, as in bench/query.py.
Each query runs `--repeat` times on each side, the sides alternating; the medians are
compared. Prints the ratios and ends with one JSON line.

    python bench/spark.py --rows 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from llmudf.calls.config import Config
from llmudf.calls.prompt import ChatPrompt
from llmudf.cli import _read_movies
from llmudf.runtime import paths

# the filter and projection queries of bench/query.py, in Spark SQL (options as a struct)
QUERIES = {
    "filter": "SELECT Title, Year FROM omdb "
    "WHERE llm_filter('Is this country in Europe?', Country)",
    "projection": "SELECT Title, llm('Which continent is this country in? Answer in one word.', "
    "Country, struct(4 AS max_tokens)) AS continent FROM omdb",
}


def fresh_server(config: Config) -> None:
    """Stop this node's server (if any) and start a warm new one."""
    from llmudf.engine.flight_client import FlightEngineClient, node_server
    from llmudf.engine.params import SamplingParams

    _stop_servers(signal.SIGKILL)
    node_server(config.model, config.engine)
    client = FlightEngineClient(model=config.model, engine=config.engine)
    client.generate([ChatPrompt("warm up").messages()], SamplingParams(max_tokens=2))
    client.close()


def _stop_servers(sig: int) -> None:
    for state in (paths.cache_dir() / "servers").glob("*.json"):
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.kill(json.loads(state.read_text())["pid"], sig)
        state.unlink(missing_ok=True)


def _warm_workers(spark) -> None:
    """Start Spark's Python workers and import what the tasks of either side import (torch
    too, for the per-batch UDF), so that neither side's timing pays for it."""

    def load(batches):
        import llmudf.connectors.spark  # noqa: F401
        import llmudf.engine.sampling  # noqa: F401

        yield from batches

    spark.range(0, 2, 1, 2).mapInArrow(load, "id long").collect()


def _frames() -> dict:
    """label -> (spark, config) -> DataFrame: the SQL queries, then the same in the DataFrame
    API (with rewrite off in `config`, its LLM Columns run per batch: the plain side)."""
    import llmudf.spark as lspark
    from llmudf.spark import llm, llm_filter

    europe, continent = (
        "Is this country in Europe?",
        "Which continent is this country in? Answer in one word.",
    )
    frames = {
        label: (lambda spark, config, query=query: lspark.sql(spark, query, config))
        for label, query in QUERIES.items()
    }
    frames["filter_dataframe"] = lambda spark, config: (
        spark.table("omdb")
        .where(llm_filter(europe, "Country", config=config))
        .select("Title", "Year")
    )
    frames["projection_dataframe"] = lambda spark, config: spark.table("omdb").select(
        "Title", llm(continent, "Country", max_tokens=4, config=config).alias("continent")
    )
    return frames


def _cache_as_omdb(spark, table) -> None:
    """`table` as the view `omdb`: two partitions, cached and materialized before any timing."""
    spark.createDataFrame(table.to_pandas()).repartition(2).cache().createOrReplaceTempView("omdb")
    spark.table("omdb").count()


def _timed(spark, frame, config: Config) -> tuple[float, list]:
    fresh_server(config)
    start = time.perf_counter()
    rows = sorted(map(repr, frame(spark, config).collect()))
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="movies in the table")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side and query")
    args = parser.parse_args()
    os.environ.setdefault("LLMUDF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "llmudf-bench"))

    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    omdb = _read_movies(args.rows)["omdb"]
    ours_config = Config(model=args.model, engine={"device": "cpu"}, cache=False, progress=False)
    plain_config = replace(ours_config, rewrite=False, dedup=False, reorder_rows=False)
    _warm_workers(spark)
    # one untimed run of every query on both sides over 10 rows, so that neither side's
    # timing pays for Spark's first-run costs (code generation, Python workers); the 10 rows
    # are cached and partitioned as the timed table is, so that the plans are the same
    frames = _frames()
    _cache_as_omdb(spark, omdb.slice(0, 10))
    for frame in frames.values():
        for config in (plain_config, ours_config):
            _timed(spark, frame, config)
    _cache_as_omdb(spark, omdb)
    report: dict = {"rows": omdb.num_rows}
    identical = True
    answers: dict[str, list] = {}
    for label, frame in frames.items():
        # the sides alternate, `--repeat` times; the medians are compared
        runs = [
            [_timed(spark, frame, config) for config in (plain_config, ours_config)]
            for _ in range(args.repeat)
        ]
        plain_s = statistics.median(plain[0] for plain, _ours in runs)
        ours_s = statistics.median(ours[0] for _plain, ours in runs)
        ours = runs[0][1][1]
        # every run, and the DataFrame API, must give the SQL query's answers
        expected = answers.setdefault(label.removesuffix("_dataframe"), ours)
        same = all(run[1] == expected for pair in runs for run in pair)
        identical &= same
        speedup = plain_s / ours_s
        print(
            f"{label:<20} rows={omdb.num_rows} answers={len(ours)} plain={plain_s:.1f}s "
            f"llmudf={ours_s:.1f}s speedup={speedup:.2f}x identical={same}"
        )
        report[f"plain_{label}_s"] = round(plain_s, 2)
        report[f"llmudf_{label}_s"] = round(ours_s, 2)
        report[f"speedup_{label}"] = round(speedup, 2)
    report["identical"] = identical
    spark.stop()
    _stop_servers(signal.SIGTERM)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
