"""The semantic join and llm_embed in Spark: SQL (`JOIN ... ON llm_filter(...)` through
`llmudf.spark.sql`) and the DataFrame API (`sem_join`), answered on the driver by the hash
oracle (tests/connectors/conftest.py) in place of the cluster; with blocking off both equal
DuckDB's per-chunk fallback."""

from __future__ import annotations

import os

import numpy as np
import pytest

import llmudf
from llmudf.calls.config import Config

pytestmark = pytest.mark.slow

LEFT = [(1, "Heat"), (2, "Up"), (3, None), (4, "Up"), (5, "Alien")]
RIGHT = [(10, "heat (1995)"), (20, "UP"), (30, "Alien"), (40, None)]
ASK = "llm_filter('Same movie?', {'left': a.title, 'right': b.title}, {'blocking': 'none'})"
SPARK_ASK = (
    "llm_filter('Same movie?', named_struct('left', a.title, 'right', b.title), "
    "named_struct('blocking', 'none'))"
)
KINDS = {
    "inner": ("JOIN", "JOIN"),
    "left": ("LEFT JOIN", "LEFT JOIN"),
    "semi": ("SEMI JOIN", "LEFT SEMI JOIN"),
}


@pytest.fixture(scope="module")
def spark():
    if os.environ.get("CI"):
        import pyspark  # noqa: F401
    else:
        pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("llmudf-semantic")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.createDataFrame(LEFT, "id int, title string").createOrReplaceTempView("a")
    session.createDataFrame(RIGHT, "id int, title string").createOrReplaceTempView("b")
    yield session


@pytest.fixture
def oracle_cluster(hash_oracle, monkeypatch):
    from llmudf.connectors.spark import SparkClient

    def generate(self, prompts, params, progress=None, on_output=None):
        return hash_oracle.generate(prompts, params, progress, on_output)

    monkeypatch.setattr(SparkClient, "generate", generate)
    return hash_oracle


def duckdb_fallback(kind: str) -> list[tuple]:
    con = llmudf.connect(cache=False, progress=False, rewrite=False)
    con.execute("CREATE TABLE a (id INTEGER, title VARCHAR)")
    con.executemany("INSERT INTO a VALUES (?, ?)", [list(r) for r in LEFT])
    con.execute("CREATE TABLE b (id INTEGER, title VARCHAR)")
    con.executemany("INSERT INTO b VALUES (?, ?)", [list(r) for r in RIGHT])
    select = "a.id" if kind == "semi" else "a.id, b.id"
    return con.sql(f"SELECT {select} FROM a {KINDS[kind][0]} b ON {ASK} ORDER BY ALL").fetchall()


def ordered(rows) -> list[tuple]:
    return sorted((tuple(r) for r in rows), key=lambda r: [(v is None, v or 0) for v in r])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sql_and_dataframe_joins_equal_the_duckdb_fallback(spark, oracle_cluster, kind):
    import llmudf.spark as lspark

    config = Config(cache=False, progress=False)
    expected = ordered(duckdb_fallback(kind))
    assert len(expected) > 1
    num_asked = len(oracle_cluster.calls)
    select = "a.id" if kind == "semi" else "a.id, b.id"
    query = f"SELECT {select} FROM a {KINDS[kind][1]} b ON {SPARK_ASK}"
    assert ordered(lspark.sql(spark, query, config=config).collect()) == expected
    # 4 distinct left values (NULL included) x 4 right values, each pair asked once
    assert len(oracle_cluster.calls) - num_asked == 16
    frame = lspark.sem_join(
        spark.table("a"),
        spark.table("b"),
        "Same movie?",
        "title",
        "title",
        how=kind,
        config=config,
        blocking="none",
    )
    if kind == "semi":
        assert frame.columns == ["id", "title"]
        assert ordered((r[0],) for r in frame.collect()) == expected
    else:
        assert len(frame.columns) == 4  # a.id, a.title, b.id, b.title
        assert ordered((r[0], r[2]) for r in frame.collect()) == expected


def test_spark_llm_embed_gives_arrays_of_384_floats(spark):
    import llmudf.spark as lspark

    lspark.register(spark, Config(cache=False))
    rows = spark.sql("SELECT title, llm_embed(title) AS v FROM a ORDER BY id").collect()
    assert rows[2]["v"] is None and len(rows[0]["v"]) == 384
    assert rows[1]["v"] == rows[3]["v"]
    frame = spark.table("a").select(lspark.llm_embed("title").alias("v"))
    got = [r["v"] for r in frame.collect()]
    assert got[2] is None
    # batched with other texts (padded to another length), a text's floats may differ in the
    # last bits: equal within float32 rounding, and different texts clearly differ
    for i in (0, 1, 3):
        np.testing.assert_allclose(got[i], rows[i]["v"], atol=1e-5)
    assert not np.allclose(rows[0]["v"], rows[1]["v"], atol=1e-2)
