"""PySpark on real local Spark: Spark SQL (whole-query rewrite), the per-batch SQL UDFs, the
DataFrame API and DuckDB give the same answers on movies data; a killed engine server
mid-query still yields complete, correct answers."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import pandas as pd
import pytest

import llmudf
from llmudf.calls.config import Config
from llmudf.runtime import paths

pytestmark = pytest.mark.slow
ENGINE = {"device": "cpu", "num_kv_pages": 512}
QUERY = (
    "SELECT ID, llm('Describe the movie.', Title, Genre) AS a, "
    "llm_filter('Is it a drama?', Genre) AS f FROM movies WHERE Year >= 2005 ORDER BY ID"
)


@pytest.fixture(scope="module")
def env(local_spark, make_tiny_model_dir):
    """A tiny model, an isolated cache dir (node servers are found there), and Spark."""
    spark = local_spark("local[2,3]", 2)  # 2 threads; a failed task is retried
    model = str(make_tiny_model_dir("llama", seed=0))
    con = sqlite3.connect(paths.movies_db())
    movies = pd.read_sql("SELECT ID, Title, Genre, Year FROM omdb ORDER BY ID LIMIT 60", con)
    spark.createDataFrame(movies).createOrReplaceTempView("movies")
    return {"spark": spark, "model": model, "movies": movies}


def config(env, **kw) -> Config:
    kw = {"max_tokens": 6, "progress": False, "cache": False, **kw}
    return Config(model=env["model"], engine=ENGINE, **kw)


def rows(df) -> list[tuple]:
    return [tuple(r) for r in df.collect()]


@pytest.fixture(scope="module")
def duckdb_answers(env):
    con = llmudf.connect(config=config(env))
    con.register("movies_df", env["movies"])
    con.execute("CREATE TABLE movies AS SELECT * FROM movies_df")
    return con.sql(QUERY).fetchall()


def test_spark_sql_dataframe_and_duckdb_agree(env, duckdb_answers):
    import llmudf.spark as lspark
    from llmudf.spark import llm, llm_filter

    spark = env["spark"]
    assert len(duckdb_answers) > 10 and len({a for _, a, _ in duckdb_answers}) > 1
    rewritten = rows(lspark.sql(spark, QUERY, config=config(env)))
    assert rewritten == [tuple(r) for r in duckdb_answers]

    per_batch = rows(lspark.sql(spark, QUERY, config=config(env, rewrite=False)))
    assert per_batch == rewritten

    cfg = config(env)
    frame = (
        spark.table("movies")
        .where("Year >= 2005")
        .select(
            "ID",
            llm("Describe the movie.", "Title", "Genre", config=cfg).alias("a"),
            llm_filter("Is it a drama?", "Genre", config=cfg).alias("f"),
        )
        .orderBy("ID")
    )
    assert rows(frame) == rewritten


def test_filter_in_where_matches_projection(env, duckdb_answers):
    import llmudf.spark as lspark

    for keep in ("", "NOT "):  # both sides: a filter ignored (or always false) fails one
        query = (
            f"SELECT ID FROM movies WHERE Year >= 2005 AND {keep}llm_filter('Is it a drama?', "
            "Genre) ORDER BY ID"
        )
        got = [r[0] for r in rows(lspark.sql(env["spark"], query, config=config(env)))]
        assert got == [i for i, _, f in duckdb_answers if f is (keep == "")]


def test_rows_without_an_answer_get_one_when_the_query_runs(env, tmp_path):
    import llmudf.spark as lspark

    spark = env["spark"]
    spark.sql(f"CREATE TABLE genres (Genre STRING) USING parquet LOCATION '{tmp_path / 'g'}'")
    spark.sql("INSERT INTO genres VALUES ('Drama'), ('Comedy'), ('Drama')")
    query = "SELECT Genre, llm_filter('Is it a drama?', Genre) AS f FROM genres ORDER BY Genre"
    try:
        frame = lspark.sql(spark, query, config=config(env))  # answered: Drama, Comedy
        spark.sql("INSERT INTO genres VALUES ('Horror'), ('Drama')")  # a row the rewrite missed
        got = rows(frame)
        assert [g for g, _ in got] == ["Comedy", "Drama", "Drama", "Drama", "Horror"]
        assert got == rows(lspark.sql(spark, query, config=config(env)))
        assert None not in [f for _, f in got]
    finally:
        spark.sql("DROP TABLE genres")


def test_killed_server_mid_query_still_returns_complete_answers(env, duckdb_answers):
    import llmudf.spark as lspark
    from llmudf.engine.flight_client import FlightEngineClient, node_server

    state = node_server(env["model"], ENGINE)
    killed = threading.Event()

    def kill_when_busy() -> None:
        client = FlightEngineClient(state["location"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.action("stats")["num_running"] > 0:
                    os.kill(state["pid"], signal.SIGKILL)
                    killed.set()
                    return
            except Exception:
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    got = rows(lspark.sql(env["spark"], QUERY, config=config(env)))
    killer.join()
    assert killed.is_set()
    assert got == [tuple(r) for r in duckdb_answers]
    assert node_server(env["model"], ENGINE)["pid"] != state["pid"]  # a new server took over


@pytest.fixture
def sent(monkeypatch):
    """The prompt batches the driver sends to the cluster, in send order."""
    from llmudf.connectors.spark import SparkClient

    batches: list[list[str]] = []
    generate = SparkClient.generate

    def record(self, prompts, params, progress=None, on_output=None):
        batches.append([chat[-1]["content"] for chat in prompts])  # the user message
        return generate(self, prompts, params, progress, on_output)

    monkeypatch.setattr(SparkClient, "generate", record)
    return batches


def test_dataframe_calls_are_answered_once_per_distinct_tuple_over_all_partitions(env, sent):
    import llmudf.spark as lspark
    from llmudf.spark import llm, llm_filter

    spark, cfg = env["spark"], config(env)
    movies = spark.table("movies").repartition(4)  # every genre in several partitions
    drama = llm_filter("Is it a drama?", "Genre", config=cfg)
    frame = movies.where(drama).select("ID", llm("Describe the movie.", "Genre", config=cfg))
    assert frame.columns == ["ID", "llm(Genre)"]
    got = sorted(rows(frame))

    genres = env["movies"]["Genre"]
    assert len(sent) == 2 and len(sent[0]) == genres.nunique() < len(genres)
    expected = rows(
        lspark.sql(
            spark,
            "SELECT ID, llm('Describe the movie.', Genre) FROM movies "
            "WHERE llm_filter('Is it a drama?', Genre)",
            config=cfg,
        )
    )
    assert got == sorted(expected) and 0 < len(got) < len(genres)
    kept = {i for i, _ in got}  # the second call sees the filter's survivors only
    kept_genres = {g for i, g in zip(env["movies"]["ID"], genres, strict=True) if i in kept}
    assert len(sent[1]) == len(kept_genres) < genres.nunique()


def test_dataframe_llm_columns_inside_expressions_groupby_and_orderby(env):
    from pyspark.sql import functions as F

    import llmudf.spark as lspark
    from llmudf.spark import llm, llm_filter, llm_score

    spark, cfg = env["spark"], config(env)
    movies = spark.table("movies")
    mixed = movies.where(llm_filter("Is it a drama?", "Genre", config=cfg) | (F.col("Year") < 2000))
    expected = rows(
        lspark.sql(
            spark,
            "SELECT ID FROM movies WHERE llm_filter('Is it a drama?', Genre) OR Year < 2000",
            config=cfg,
        )
    )
    assert sorted(rows(mixed.select("ID"))) == sorted(expected)

    describe = llm("Describe the movie.", "Title", config=cfg)
    upper = rows(movies.withColumn("u", F.upper(describe)).orderBy("ID").select("ID", "u"))
    plain = rows(movies.withColumn("d", describe).orderBy("ID").select("ID", "d"))
    assert upper == [(i, d.upper()) for i, d in plain]
    assert len({d for _, d in plain}) > 1

    score = llm_score("How good is it?", "Genre", config=cfg)
    by_year = movies.groupBy("Year").agg(F.avg(score).alias("s")).orderBy("Year")
    sql = "SELECT Year, avg(llm_score('How good is it?', Genre)) AS s FROM movies GROUP BY Year"
    assert rows(by_year) == rows(lspark.sql(spark, sql + " ORDER BY Year", config=cfg))
    ranked = rows(movies.orderBy(describe.desc(), "ID").select("ID"))
    sql = "SELECT ID FROM movies ORDER BY llm('Describe the movie.', Title) DESC, ID"
    assert ranked == rows(lspark.sql(spark, sql, config=cfg))
    assert ranked != sorted(ranked)  # the answers, not the IDs, lead the order


def test_dataframe_nested_calls_and_per_batch_mode_agree(env):
    from llmudf.spark import llm

    spark = env["spark"]
    movies = spark.table("movies").where("Year >= 2005")

    def nested(cfg):
        inner = llm("Genre in one word?", "Genre", config=cfg)
        return sorted(rows(movies.select("ID", llm("Describe it.", inner.alias("g"), config=cfg))))

    whole = nested(config(env))
    assert whole == nested(config(env, rewrite=False))
    assert len(whole) == len(env["movies"].query("Year >= 2005"))


def test_dataframe_rows_added_after_the_call_still_get_answers(env, tmp_path):
    from llmudf.spark import llm_filter

    spark = env["spark"]
    spark.sql(f"CREATE TABLE genres2 (Genre STRING) USING parquet LOCATION '{tmp_path / 'g'}'")
    spark.sql("INSERT INTO genres2 VALUES ('Drama'), ('Comedy'), (NULL)")
    try:
        frame = spark.table("genres2").withColumn(
            "f", llm_filter("Is it a drama?", "Genre", config=config(env))
        )
        spark.sql("INSERT INTO genres2 VALUES ('Horror'), ('Drama')")
        got = rows(frame.orderBy("Genre"))
        assert [g for g, _ in got] == [None, "Comedy", "Drama", "Drama", "Horror"]
        assert None not in [f for g, f in got if g is not None]
        fresh = rows(
            spark.table("genres2")
            .withColumn("f", llm_filter("Is it a drama?", "Genre", config=config(env)))
            .orderBy("Genre")
        )
        assert got == fresh
    finally:
        spark.sql("DROP TABLE genres2")


def test_dataframe_bad_calls_fail_when_the_column_is_made(env):
    from llmudf.calls.functions import LLMCallError
    from llmudf.spark import llm, llm_choice

    with pytest.raises(TypeError, match="instruction must be a str or a Column"):
        llm(42, "Title")
    with pytest.raises(TypeError, match="fields are column names or Columns"):
        llm("Describe.", 3.5)
    with pytest.raises(LLMCallError, match="unknown option"):
        llm("Describe.", "Title", max_tokns=3)
    with pytest.raises(LLMCallError, match="choices"):
        llm_choice("Mood?", "Title", choices=[])


def test_answered_rows_are_not_sent_to_the_model_again_when_the_query_runs(env):
    """Spark evaluates the per-batch UDF that answers missed tuples on every row: it must not
    ask the model for the rows whose answers were found."""
    import llmudf.spark as lspark
    from llmudf.engine.flight_client import FlightEngineClient, node_server
    from llmudf.spark import llm_filter

    spark, cfg = env["spark"], config(env)
    client = FlightEngineClient(node_server(env["model"], ENGINE)["location"])
    query = "SELECT ID FROM movies WHERE llm_filter('Is it a drama?', Genre)"
    frames = [
        lspark.sql(spark, query, config=cfg),
        spark.table("movies").where(llm_filter("Is it a drama?", "Genre", config=cfg)),
    ]
    con = llmudf.connect(config=cfg)
    con.register("movies", env["movies"])
    expected = sorted(i for (i,) in con.sql(query).fetchall())
    assert 0 < len(expected) < len(env["movies"])
    for frame in frames:
        served = client.action("stats")["num_served"]
        assert frame.count() == len(expected)
        assert sorted(r[0] for r in rows(frame)) == expected
        assert client.action("stats")["num_served"] == served


@pytest.mark.parametrize(
    "query",
    [
        "SELECT ID, llm('Shorten it.', struct(llm('Describe the genre.', Genre) AS d)) AS s "
        "FROM movies WHERE Year >= 2000 ORDER BY ID",
        "SELECT Genre, llm('Describe the genre.', Genre) AS d, COUNT(*) AS n FROM movies "
        "WHERE Year >= 2000 GROUP BY Genre ORDER BY Genre",
    ],
    ids=["nested", "grouped"],
)
def test_nested_and_grouped_calls_agree_with_duckdb_and_are_answered_once(env, query):
    import llmudf.spark as lspark
    from llmudf.engine.flight_client import FlightEngineClient, node_server

    con = llmudf.connect(config=config(env))
    con.register("movies", env["movies"])
    expected = con.sql(query).fetchall()
    assert len(expected) > 3 and len({r[1] for r in expected}) > 1

    spark, cfg = env["spark"], config(env)
    frame = lspark.sql(spark, query, config=cfg)
    client = FlightEngineClient(node_server(env["model"], ENGINE)["location"])
    served = client.action("stats")["num_served"]
    assert rows(frame) == expected
    assert rows(frame) == expected
    assert client.action("stats")["num_served"] == served  # answered when `sql` ran
    assert rows(lspark.sql(spark, query, config=config(env, rewrite=False))) == expected


def test_a_second_filter_asks_the_model_only_for_the_survivors_of_the_first(env):
    """The argument query of the second LLM filter joins the first one's answers; the rows
    found there must not reach the model through the per-batch UDF."""
    import llmudf.spark as lspark
    from llmudf.engine.flight_client import FlightEngineClient, node_server

    spark, cfg = env["spark"], config(env)
    drama = "llm_filter('Is it a drama?', Genre)"
    passed = rows(lspark.sql(spark, f"SELECT DISTINCT Genre FROM movies WHERE {drama}", cfg))
    movies = env["movies"]
    survivors = movies[movies.Genre.isin([g for (g,) in passed])]
    assert 0 < len(survivors) < len(movies)

    client = FlightEngineClient(node_server(env["model"], ENGINE)["location"])
    served = client.action("stats")["num_served"]
    query = f"SELECT ID FROM movies WHERE {drama} AND llm_filter('Is it long?', Title)"
    frame = lspark.sql(spark, query, config=cfg)
    asked = client.action("stats")["num_served"] - served
    assert asked == movies.Genre.nunique(dropna=False) + survivors.Title.nunique()
    con = llmudf.connect(config=cfg)
    con.register("movies", movies)
    assert sorted(rows(frame)) == sorted(con.sql(query).fetchall())


@pytest.mark.parametrize(
    "call",
    [
        "llm_choice('Mood?', array('happy', 'sad', 'tense'), Title, Genre)",
        'llm_json(\'Describe it.\', \'{"type": "object", "properties": '
        '{"mood": {"type": "string"}}, "required": ["mood"]}\', Genre)',
    ],
    ids=["llm_choice", "llm_json"],
)
def test_choice_and_json_calls_agree_with_the_per_batch_path_and_are_answered_once(env, call):
    import llmudf.spark as lspark
    from llmudf.engine.flight_client import FlightEngineClient, node_server

    spark = env["spark"]
    query = f"SELECT ID, {call} AS a FROM movies WHERE Year >= 2005 ORDER BY ID"
    frame = lspark.sql(spark, query, config=config(env, max_tokens=12))
    client = FlightEngineClient(node_server(env["model"], ENGINE)["location"])
    served = client.action("stats")["num_served"]
    got = rows(frame)
    assert client.action("stats")["num_served"] == served
    per_batch = rows(lspark.sql(spark, query, config=config(env, max_tokens=12, rewrite=False)))
    assert got == per_batch and len(got) > 10
    assert len({a for _, a in got}) > 1, got[:5]


def test_the_dataframe_methods_are_installed_once_and_can_be_put_back(env):
    from pyspark.errors import AnalysisException
    from pyspark.sql.classic.dataframe import DataFrame

    from llmudf.connectors.spark import install, is_installed, uninstall
    from llmudf.spark import llm

    wrapped = DataFrame.select
    install()
    assert is_installed() and DataFrame.select is wrapped  # a second install does nothing
    movies = env["spark"].table("movies")
    uninstall()
    try:
        assert not hasattr(DataFrame.select, "__wrapped__")
        with pytest.raises(AnalysisException, match="__llmudf_answer_"):
            movies.select(llm("Describe the movie.", "Title", config=config(env)))
    finally:
        install()
    assert DataFrame.select.__wrapped__ is wrapped.__wrapped__


def test_the_site_registry_keeps_the_newest_calls_only(env, monkeypatch):
    from llmudf.calls.functions import LLMCallError
    from llmudf.connectors.spark import frame
    from llmudf.spark import llm

    monkeypatch.setattr(frame, "_SITES", frame._Registry(2))
    cfg = config(env)
    old, mid, new = [llm(f"Question {i}?", "Title", config=cfg) for i in range(3)]
    assert [s.spec.function.name for s in frame.sites_in([mid, new])] == ["llm", "llm"]
    assert str(llm("Question 2?", "Title", config=cfg)) == str(new)  # the same call, one site
    with pytest.raises(LLMCallError, match="forgotten; make it again"):
        env["spark"].table("movies").select(old)
