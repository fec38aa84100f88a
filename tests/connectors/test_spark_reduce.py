"""llm_reduce on real local Spark with a tiny model behind the node's engine server: the
DataFrame API with 1 and 4 partitions, `llmudf.spark.sql` and plain `spark.sql` after
`register` give DuckDB's answers; a reduce in WHERE is a clear error."""

from __future__ import annotations

import pandas as pd
import pytest

import llmudf
from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError

pytestmark = pytest.mark.slow
ENGINE = {"device": "cpu", "num_kv_pages": 512}
# no ORDER BY: Spark's sort would sample the aggregate (and ask the model) once more
QUERY = (
    "SELECT genre, llm_reduce('What do these movies share?', title, year) AS s "
    "FROM movies GROUP BY genre"
)
# plain SQL UDFs see values, not column names: a named struct names the fields
PLAIN_QUERY = (
    "SELECT genre, llm_reduce('What do these movies share?', "
    "named_struct('title', title, 'year', year)) AS s FROM movies GROUP BY genre"
)


@pytest.fixture(scope="module")
def env(local_spark, make_tiny_model_dir):
    spark = local_spark("local[2]", 4)
    rows = [
        (["Drama", "Comedy", "Horror"][i % 3], f"movie {i} of a kind", 1950 + i) for i in range(24)
    ]
    movies = pd.DataFrame(rows, columns=["genre", "title", "year"])
    config = Config(
        model=str(make_tiny_model_dir("llama", seed=1)),
        engine=ENGINE,
        max_tokens=6,
        progress=False,
        cache=False,
    )
    return {"spark": spark, "movies": movies, "config": config}


def rows(frame) -> list[tuple]:
    return sorted(tuple(r) for r in frame.collect())


@pytest.fixture(scope="module")
def duckdb_answers(env):
    con = llmudf.connect(config=env["config"])
    con.register("movies_frame", env["movies"])
    con.execute("CREATE TABLE movies AS SELECT * FROM movies_frame")
    return sorted(con.sql(QUERY).fetchall())


def test_dataframe_api_with_1_and_4_partitions_gives_duckdbs_answers(env, duckdb_answers):
    from llmudf.spark import llm_reduce

    frame = env["spark"].createDataFrame(env["movies"])
    answers = []
    for parts in (1, 4):
        shuffled = frame.repartition(parts)
        summary = llm_reduce("What do these movies share?", "title", "year", config=env["config"])
        grouped = shuffled.groupBy("genre").agg(summary.alias("s"))
        answers.append(rows(grouped))
    assert answers[0] == answers[1] == duckdb_answers
    assert len({s for _g, s in duckdb_answers}) > 1  # answers differ, so equality means something


def test_spark_sql_and_plain_sql_after_register_agree(env, duckdb_answers):
    spark = env["spark"]
    spark.createDataFrame(env["movies"]).repartition(4).createOrReplaceTempView("movies")
    rewritten = llmudf.spark.sql(spark, QUERY, config=env["config"])
    assert rows(rewritten) == duckdb_answers
    llmudf.spark.register(spark, config=env["config"])
    assert rows(spark.sql(PLAIN_QUERY)) == duckdb_answers


def test_reduce_in_where_is_a_clear_error(env):
    spark = env["spark"]
    spark.createDataFrame(env["movies"]).createOrReplaceTempView("movies")
    bad = "SELECT genre FROM movies WHERE llm_reduce('Q', title) = 'x' GROUP BY genre"
    with pytest.raises(LLMCallError, match="llm_reduce #1: .*cannot be in WHERE"):
        llmudf.spark.sql(spark, bad, config=env["config"])
