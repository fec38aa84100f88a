"""End to end with the real default model (SmolLM2-135M-Instruct): a few quick queries."""

from __future__ import annotations

import pytest

import llmudf
from llmudf.cli import _read_movies, main

pytestmark = pytest.mark.slow

COUNTRIES = ["France", "USA", "Germany", "China", "France", "Italy", "USA", "Spain"]


@pytest.fixture(scope="module")
def movies():
    return _read_movies(24)


def _connect(tmp_path, movies=None, **options):
    con = llmudf.connect(cache_dir=str(tmp_path), progress=False, **options)
    con.execute("CREATE TABLE c AS SELECT * FROM UNNEST(?) AS t(country)", [COUNTRIES])
    for name, table in (movies or {}).items():
        con.register(f"{name}_arrow", table)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_arrow")
    return con


def test_filter_and_projection_equal_on_both_paths(tmp_path, movies):
    sql = (
        "SELECT Title, llm('Which continent is this country in? One word.', Country, "
        "{'max_tokens': 4}) AS continent FROM omdb "
        "WHERE llm_filter('Is this movie in English?', Language) ORDER BY Title"
    )
    optimized = _connect(tmp_path / "a", movies)
    naive = _connect(tmp_path / "b", movies, rewrite=False, dedup=False, reorder_rows=False)
    rows = optimized.sql(sql).fetchall()
    assert optimized.last_fallback is None
    stats = optimized.last_stats
    assert stats[0].site == "llm_filter #2 in WHERE" and stats[0].num_requests < stats[0].num_rows
    assert rows == naive.sql(sql).fetchall()
    assert rows and all(isinstance(c, str) and c for _t, c in rows)


def test_answers_make_sense_and_rerun_hits_the_cache(tmp_path):
    con = _connect(tmp_path)
    sql = (
        "SELECT country, llm_choice('Which continent is this country in?', "
        "['Europe', 'Asia', 'Americas', 'Africa'], country) FROM c"
    )
    answers = dict(con.sql(sql).fetchall())
    assert con.last_stats[0].num_requests == 6  # 8 rows, 6 distinct countries
    assert answers["France"] == "Europe" and answers["China"] == "Asia"
    assert set(answers.values()) <= {"Europe", "Asia", "Americas", "Africa"}
    assert dict(con.sql(sql).fetchall()) == answers
    assert con.last_stats[0].num_sent == 0


def test_demo_runs(capsys):
    assert main(["demo", "--rows", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("-- ") == 3 and "rows ->" in out
