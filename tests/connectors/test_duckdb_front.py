"""llmudf.connect() as a DuckDB connection: the everyday shapes of issue #10 (local
DataFrames by name, long-lived relations, cursors, multi-statement strings, parameters,
DML, fallbacks), with a real DuckDB and the tiny random-init engine."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError

TITLES = ["Up", "Heat", "Alien", "Cars", "Saw", "Jaws", "Big", "Fargo"]


@pytest.fixture
def con(make_config):
    con = llmudf.connect(config=make_config(cache=False))
    con.execute(
        "CREATE TABLE m AS SELECT i AS id, ['Up','Heat','Alien','Cars','Saw','Jaws','Big',"
        "'Fargo'][1 + i % 8] AS title, 1990 + i % 5 AS year FROM range(16) t(i)"
    )
    yield con
    con.close()


def _sent(con) -> int:
    return sum(s.num_sent for s in con.last_stats)


def test_plain_queries_see_the_callers_dataframes(con):
    df = pd.DataFrame({"a": [1, 2, 3]})  # noqa: F841 - found by name, as DuckDB does
    assert con.sql("SELECT sum(a) FROM df").fetchall() == [(6,)]
    assert con.execute("SELECT count(*) FROM df").fetchall() == [(3,)]


def test_llm_queries_over_a_local_dataframe(con):
    movies = pd.DataFrame({"title": TITLES * 2, "year": range(16)})  # noqa: F841
    got = con.sql("SELECT title, llm('Genre?', title) AS g FROM movies ORDER BY year").fetchall()
    assert con.last_fallback is None
    assert _sent(con) == len(TITLES)  # deduplicated over the DataFrame
    per_chunk = llmudf.connect(config=con.config.with_options({}))
    per_chunk.config.rewrite = False
    naive = per_chunk.sql("SELECT title, llm('Genre?', title) AS g FROM movies").fetchall()
    assert sorted(got) == sorted(naive)
    assert len({g for _t, g in got}) > 1


def test_a_relation_outlives_later_llm_queries(con):
    kept = con.sql("SELECT id, llm('Genre?', title) AS g FROM m WHERE id < 4")
    expected = kept.fetchall()
    for i in range(20):
        con.sql(f"SELECT llm('Other {i}?', title) FROM m WHERE id = {i % 16}").fetchall()
    # no ORDER BY: DuckDB may return the rows in another order on another run
    assert sorted(kept.fetchall()) == sorted(expected)
    assert sorted(kept.filter("id > 1").fetchall()) == sorted(r for r in expected if r[0] > 1)


def test_multi_statement_strings_are_rewritten_statement_by_statement(con):
    single = con.sql("SELECT id, llm('Genre?', title) AS g FROM m").fetchall()
    got = con.sql(
        "CREATE TABLE t2 AS SELECT * FROM m WHERE id < 8; "
        "SELECT id, llm('Genre?', title) AS g FROM m"
    ).fetchall()
    assert con.last_fallback is None
    assert sorted(got) == sorted(single)
    assert con.sql("SELECT count(*) FROM t2").fetchall() == [(8,)]


def test_bare_columns_are_named_by_column_on_the_per_chunk_path_too(make_config):
    results = []
    for rewrite in (True, False):
        con = llmudf.connect(config=make_config(cache=False, rewrite=rewrite))
        sql = "SELECT title, llm('Genre?', title) FROM m"
        con.execute("CREATE TABLE m AS SELECT unnest(['Up', 'Heat', 'Saw', 'Big']) AS title")
        results.append(sorted(con.sql(sql).fetchall()))
        results.append(sorted(con.sql(f"SELECT 1; {sql}").fetchall()))
        con.close()
    plain = duckdb.connect()
    plain.execute("CREATE TABLE m AS SELECT unnest(['Up', 'Heat', 'Saw', 'Big']) AS title")
    llmudf.register(plain, make_config(cache=False))
    struct = sorted(plain.sql("SELECT title, llm('Genre?', {'title': title}) FROM m").fetchall())
    assert results == [struct] * 4
    assert len({a for _t, a in struct}) > 1


def test_a_null_instruction_gives_null(con):
    rows = con.sql("SELECT llm(NULL, title) AS a, llm_filter(NULL, title) AS f FROM m").fetchall()
    assert rows == [(None, None)] * 16
    assert _sent(con) == 0


def test_last_stats_belong_to_the_latest_query(con):
    con.sql("SELECT llm('Genre?', title) FROM m").fetchall()
    assert con.last_stats
    con.sql("SELECT count(*) FROM m").fetchall()
    assert con.last_stats == [] and con.last_fallback is None


def test_a_cursor_is_an_llmudf_connection(con):
    cursor = con.cursor()
    assert isinstance(cursor, llmudf.Connection)
    got = cursor.sql("SELECT id, llm('Genre?', title) AS g FROM m").fetchall()
    assert cursor.last_fallback is None and _sent(cursor) == len(TITLES)
    assert sorted(got) == sorted(con.sql("SELECT id, llm('Genre?', title) AS g FROM m").fetchall())


def test_parameters_are_inlined_and_rewritten(con):
    expected = con.sql("SELECT id, llm('Genre?', title) AS g FROM m WHERE year > 1992").fetchall()
    for sql, params in [
        ("SELECT id, llm('Genre?', title) AS g FROM m WHERE year > ?", [1992]),
        ("SELECT id, llm('Genre?', title) AS g FROM m WHERE year > $1", [1992]),
        ("SELECT id, llm('Genre?', title) AS g FROM m WHERE year > $y", {"y": 1992}),
    ]:
        assert sorted(con.sql(sql, params=params).fetchall()) == sorted(expected)
        assert con.last_fallback is None
        assert sorted(con.execute(sql, params).fetchall()) == sorted(expected)


def test_ctas_and_insert_select_are_rewritten(con):
    con.execute("CREATE TABLE a AS SELECT id, llm('Genre?', title) AS g FROM m")
    assert con.last_fallback is None and _sent(con) == len(TITLES)
    con.execute("INSERT INTO a SELECT id + 100, llm('Genre?', title) FROM m WHERE id < 3")
    assert con.last_fallback is None
    rows = dict(con.sql("SELECT id, g FROM a").fetchall())
    assert len(rows) == 19 and rows[100] == rows[0] == rows[8]


def test_update_and_delete_run_per_chunk(con):
    con.execute("CREATE TABLE u AS SELECT id, title, NULL::VARCHAR AS g FROM m")
    con.execute("UPDATE u SET g = llm('Genre?', title) WHERE id < 4")
    assert con.last_fallback.startswith("UnsupportedQuery")
    expected = con.sql("SELECT id, llm('Genre?', title) FROM m WHERE id < 4").fetchall()
    assert sorted(con.sql("SELECT id, g FROM u WHERE id < 4").fetchall()) == sorted(expected)
    keep = con.sql("SELECT count(*) FROM m WHERE NOT llm_filter('Old?', title)").fetchall()[0][0]
    con.execute("DELETE FROM u WHERE llm_filter('Old?', title)")
    assert con.sql("SELECT count(*) FROM u").fetchall()[0][0] == keep


def test_a_users_own_error_names_the_call_site(con):
    with pytest.raises(LLMCallError, match=r"llm #1 in SELECT: .*nosuch"):
        con.sql("SELECT llm('Genre?', nosuch) FROM m")
    with pytest.raises(duckdb.CatalogException, match="nosuchtable"):
        con.sql("SELECT llm('Genre?', title) FROM nosuchtable")


def test_a_failing_rewritten_query_falls_back_per_chunk(con, monkeypatch):
    from llmudf.optimizer.rewrite import QueryRewrite

    real = QueryRewrite.steps

    def broken(self, *args, **kwargs):
        final = yield from real(self, *args, **kwargs)
        return final + " AND __no_such_column"

    monkeypatch.setattr(QueryRewrite, "steps", broken)
    got = con.sql("SELECT id, llm('Genre?', title) AS g FROM m WHERE id < 4").fetchall()
    assert "__no_such_column" in con.last_fallback
    monkeypatch.undo()
    assert sorted(got) == sorted(
        con.sql("SELECT id, llm('Genre?', title) AS g FROM m WHERE id < 4").fetchall()
    )


def test_explain_of_a_select_without_from(con):
    plan = con.explain_llm("SELECT llm('Capital?', {'country': 'France'}) AS a")
    assert plan.sites[0].num_rows == 1


def test_an_interrupted_query_leaves_the_connection_ready(make_config, monkeypatch):
    from llmudf.runtime.progress import BatchProgress

    # two sequences at a time, so answers finish over several steps; result cache on
    engine = {"device": "cpu", "kv_cache_bytes": 64 << 20, "max_num_seqs": 2}
    con = llmudf.connect(config=make_config(engine=engine))
    con.execute("CREATE TABLE m AS SELECT 'title ' || i AS title FROM range(12) t(i)")
    sql = "SELECT title, llm('Genre?', title) AS g FROM m"
    advance = BatchProgress.advance

    def interrupt(self, num_done, *args):  # Ctrl-C once 4 of the 12 prompts are answered
        if num_done >= 4:
            raise KeyboardInterrupt
        return advance(self, num_done, *args)

    monkeypatch.setattr(BatchProgress, "advance", interrupt)
    with pytest.raises(KeyboardInterrupt):
        con.sql(sql)
    monkeypatch.undo()
    got = con.sql(sql).fetchall()
    (stats,) = con.last_stats
    assert stats.num_cache_hits >= 4 and stats.num_sent == 12 - stats.num_cache_hits
    fresh = llmudf.connect(config=make_config(cache=False))
    fresh.execute("CREATE TABLE m AS SELECT 'title ' || i AS title FROM range(12) t(i)")
    assert sorted(got) == sorted(fresh.sql(sql).fetchall())
    assert len({g for _t, g in got}) > 1


def test_a_call_over_a_categorical_dataframe_column(con):
    frame = pd.DataFrame({"genre": pd.Categorical(["drama", "comedy", "drama", None])})  # noqa: F841
    got = con.sql("SELECT genre, llm('Mood?', genre) AS m FROM frame").fetchall()
    assert con.last_fallback is None and _sent(con) == 3  # drama, comedy, NULL
    plain = pd.DataFrame({"genre": ["drama", "comedy", "drama", None]})  # noqa: F841
    assert sorted(got, key=repr) == sorted(
        con.sql("SELECT genre, llm('Mood?', genre) AS m FROM plain").fetchall(), key=repr
    )


def test_explain_estimates_the_time_from_the_engines_measured_speed(con):
    sql = "SELECT llm('Genre?', title) FROM m"
    con.sql(sql).fetchall()  # the engine has run: its speed is known
    (site,) = con.explain_llm(sql.replace("Genre?", "Mood?")).sites
    assert site.unit == "tokens" and site.estimated_seconds > 0
    assert f"estimated time: ~{site.estimated_seconds:.1f} s" in str(con.explain_llm(sql))
    html = con.last_stats._repr_html_()
    assert "prompts sent" in html and f"<td>{_sent(con)}</td>" in html


def test_cursors_answer_from_several_threads_at_once(con):
    from concurrent.futures import ThreadPoolExecutor

    queries = [f"SELECT id, llm('Genre {i % 3}?', title) AS g FROM m WHERE id % 4 = {i % 4}"
               for i in range(8)]  # fmt: skip
    expected = [sorted(con.sql(q).fetchall()) for q in queries]

    def run(query: str):
        cursor = con.cursor()
        return sorted(cursor.sql(query).fetchall())

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, queries))
    assert got == expected
    assert len({a for rows in got for _i, a in rows}) > 1


def test_an_interrupted_duckdb_query_is_not_rerun_per_chunk(con, monkeypatch):
    import llmudf.connectors.duckdb as connector

    def interrupted(*args, **kwargs):
        raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")

    monkeypatch.setattr(connector, "drive", interrupted)
    with pytest.raises(duckdb.InterruptException):
        con.sql("SELECT llm('Genre?', title) FROM m")
    assert con.last_fallback is None and _sent(con) == 0


def test_an_unaliased_call_keeps_its_column_name(con):
    """The rewrite's helper names never become column names: an unaliased call's column is
    named by the call as written, on the rewrite and on the per-chunk path alike."""
    rewritten = con.sql("SELECT llm('Genre?', title), year FROM m ORDER BY id LIMIT 3")
    assert con.last_fallback is None
    assert rewritten.columns == ["llm('Genre?', title)", "year"]
    grouped = con.sql("SELECT year, llm_reduce('Sum up.', title) FROM m GROUP BY year")
    assert grouped.columns == ["year", "llm_reduce('Sum up.', title)"]
    per_chunk = llmudf.connect(config=con.config.with_options({}))
    per_chunk.config.rewrite = False
    per_chunk.execute("CREATE TABLE m AS SELECT 'Up' AS title")
    assert per_chunk.sql("SELECT llm('Genre?', title) FROM m").columns == ["llm('Genre?', title)"]
