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
categorical columns (300 top movies: 59 countries), the common case, as in bench/query.py,
with the same instructions, on which the default model's answers vary: the projection's
answers must hold >= 3 distinct values and the filter must keep and drop >= 3 rows each, or
the run fails its own check (exit 1, after the result file is written).
Each query runs `--repeat` times on each side, the sides alternating; the medians are
compared and the spread printed. Writes bench/results/spark.json.

    python bench/spark.py --rows 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import Checks, Runs, alternate, write_result

from llmudf.calls.config import Config
from llmudf.calls.prompt import ChatPrompt
from llmudf.cli import _read_movies
from llmudf.runtime import paths

FILTER = "Is this country an island?"
PROJECTION = "What is the capital of this country? Answer with the city name only."
# the filter and projection queries of bench/query.py, in Spark SQL (options as a struct)
QUERIES = {
    "filter": f"SELECT Title, Year FROM omdb WHERE llm_filter('{FILTER}', Country)",
    "projection": f"SELECT Title, llm('{PROJECTION}', Country, struct(8 AS max_tokens)) AS "
    "capital FROM omdb",
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

    frames = {
        label: (lambda spark, config, query=query: lspark.sql(spark, query, config))
        for label, query in QUERIES.items()
    }
    frames["filter_dataframe"] = lambda spark, config: (
        spark.table("omdb")
        .where(llm_filter(FILTER, "Country", config=config))
        .select("Title", "Year")
    )
    frames["projection_dataframe"] = lambda spark, config: spark.table("omdb").select(
        "Title", llm(PROJECTION, "Country", max_tokens=8, config=config).alias("capital")
    )
    return frames


def _cache_as_omdb(spark, table) -> None:
    """`table` as the view `omdb`: two partitions, cached and materialized before any timing."""
    spark.createDataFrame(table.to_pandas()).repartition(2).cache().createOrReplaceTempView("omdb")
    spark.table("omdb").count()


def _collect(spark, frame, config: Config) -> list:
    return sorted(frame(spark, config).collect(), key=repr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="movies in the table")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side and query")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
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
            fresh_server(config)
            _collect(spark, frame, config)
    _cache_as_omdb(spark, omdb)
    configs = {"plain": plain_config, "llmudf": ours_config}
    report: dict = {"rows": omdb.num_rows, "repeat": args.repeat, "queries": {}}
    checks = Checks()
    answers: dict[str, list] = {}
    for label, frame in frames.items():
        # the sides alternate, `--repeat` times, each run on a fresh server; medians compared
        runs = alternate(
            {side: lambda c=c, f=frame: _collect(spark, f, c) for side, c in configs.items()},
            args.repeat,
            prepare=lambda side: fresh_server(configs[side]),
        )
        plain, ours = runs["plain"], runs["llmudf"]
        rows = ours.results[0]
        # every run, and the DataFrame API, must give the SQL query's answers
        query = label.removesuffix("_dataframe")
        expected = answers.setdefault(query, rows)
        same = all(result == expected for side in runs.values() for result in side.results)
        num_distinct = _check_answers(checks, label, rows, omdb.num_rows)
        speedup = plain.median / ours.median
        print(
            f"{label:<20} rows={omdb.num_rows} answers={len(rows)} distinct={num_distinct} "
            f"plain={plain.median:.1f}s (spread {plain.spread:.0%}) "
            f"llmudf={ours.median:.1f}s (spread {ours.spread:.0%}) "
            f"speedup={speedup:.2f}x identical={same}"
        )
        report["queries"][label] = _query_report(plain, ours, same, num_distinct)
    queries = report["queries"]
    report["identical"] = all(q["identical"] for q in queries.values())
    spark.stop()
    _stop_servers(signal.SIGTERM)
    headline = {f"speedup_{label}": q["speedup"] for label, q in queries.items()}
    headline["identical"] = report["identical"]
    headline["distinct_answers_projection"] = queries.get("projection", {}).get("distinct_answers")
    headline = {k: v for k, v in headline.items() if v is not None}
    targets = {k: ">= 2.0" for k in headline if k.startswith("speedup_")}
    targets["identical"] = "== true"
    if "distinct_answers_projection" in headline:
        targets["distinct_answers_projection"] = ">= 3"
    print(json.dumps(headline))
    write_result("spark", report, headline=headline, targets=targets,
                 results_dir=args.results_dir)  # fmt: skip
    checks.exit_if_failed()


def _query_report(plain: Runs, ours: Runs, identical: bool, num_distinct: int) -> dict:
    return {
        "plain": plain.summary(),
        "llmudf": ours.summary(),
        "speedup": round(plain.median / ours.median, 3),
        "identical": identical,
        "distinct_answers": num_distinct,
    }


def _check_answers(checks: Checks, label: str, rows: list, total: int) -> int:
    """Distinct answers of a projection (its LLM column), or of a filter (2 when it keeps
    some rows and drops others); records a failure when they do not vary enough."""
    if label.startswith("projection"):
        return checks.require_varying(label, [row[-1] for row in rows])
    kept, dropped = len(rows), total - len(rows)
    checks.require(
        kept >= 3 and dropped >= 3,
        f"{label}: the LLM filter kept {kept} and dropped {dropped} rows; both need >= 3 for "
        "'identical' to mean anything",
    )
    return int(kept > 0) + int(dropped > 0)


if __name__ == "__main__":
    main()
