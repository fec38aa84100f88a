"""llmudf.connect(): the whole-query path against the per-chunk UDF path, with a real DuckDB
and a real (tiny, random-init) engine."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError


def _text(rng: random.Random) -> str:
    # long random values: the tiny random model's answers then vary from row to row
    return "".join(rng.choice("abcdefghijklmnop ") for _ in range(48))


def _load(con) -> None:
    rng = random.Random(0)
    titles = [_text(rng) for _ in range(6)]
    genres = [_text(rng) for _ in range(3)] + [None]
    rows = [(i, titles[i % 6], genres[i % 4], 1990 + i % 7) for i in range(14)]
    con.execute("CREATE TABLE m (id INTEGER, title VARCHAR, genre VARCHAR, year INTEGER)")
    con.executemany("INSERT INTO m VALUES (?, ?, ?, ?)", rows)
    con.execute("CREATE TABLE r AS SELECT id, title AS note FROM m WHERE id % 3 = 0")


SHAPES = [
    "SELECT id, llm('Summarize', title, genre) AS a FROM m",
    "SELECT id FROM m WHERE year > 1992 AND (llm_filter('Keep?', title) OR id < 3)",
    "SELECT id FROM m WHERE llm_filter('Keep?', title) AND llm_filter('Also?', genre)",
    "SELECT genre, AVG(llm_score('Rate', title)) AS s, COUNT(*) AS n FROM m GROUP BY genre",
    "SELECT m.id, llm_choice('Pick', ['red', 'green', 'blue'], title, note) AS c "
    "FROM m JOIN r ON m.id = r.id",
    "WITH k AS (SELECT * FROM m WHERE llm_filter('Keep?', genre)) "
    "SELECT id, llm('Why?', {'t': title}) AS w FROM k",
    "SELECT id, x FROM (SELECT id, llm('S', title) AS x FROM m) s WHERE id IN "
    "(SELECT id FROM r) ORDER BY id LIMIT 3",
    "SELECT id, llm('S', title, {'max_tokens': 3}) AS a FROM m ORDER BY year, id LIMIT 4",
    "SELECT id, llm('Say hi') AS a FROM m",  # an instruction only: every row gets the answer
]


def _run(make_config, sql: str, **options):
    con = llmudf.connect(config=make_config(**options))
    _load(con)
    rows = sorted(map(repr, con.sql(sql).fetchall()))
    stats, fallback = con.last_stats, con.last_fallback
    con.close()
    return rows, stats, fallback


@pytest.mark.parametrize("sql", SHAPES)
def test_whole_query_path_equals_per_chunk_path(make_config, sql):
    naive, _s, why = _run(
        make_config, sql, cache=False, rewrite=False, dedup=False, reorder_rows=False
    )
    assert why == "rewrite off"
    optimized, stats, fallback = _run(make_config, sql, cache=False)
    assert fallback is None
    assert optimized == naive
    assert sum(s.num_sent for s in stats) > 0


def test_answers_vary_so_the_equivalence_means_something(make_config):
    rows, _stats, _f = _run(make_config, "SELECT llm_filter('Keep?', title) FROM m")
    assert len(set(rows)) == 2


def test_rerun_is_answered_from_the_cache_even_in_a_new_process(make_config, tiny_model_path):
    config = make_config()
    sql = "SELECT id, llm('Summarize', title) AS a FROM m WHERE llm_filter('Keep?', genre)"
    first, stats, _f = _run(make_config, sql)
    assert sum(s.num_sent for s in stats) > 0
    again, stats, _f = _run(make_config, sql)
    assert again == first
    assert sum(s.num_sent for s in stats) == 0
    assert sum(s.num_cache_hits for s in stats) > 0
    code = (
        "import sys, llmudf\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from test_duckdb import _load\n"
        "con = llmudf.connect(model=sys.argv[1], cache_dir=sys.argv[2], progress=False,\n"
        "                     max_tokens=6, engine={'device': 'cpu'})\n"
        "_load(con)\n"
        f"rows = sorted(map(repr, con.sql({sql!r}).fetchall()))\n"
        "print(sum(s.num_sent for s in con.last_stats), len(rows))\n"
    )
    argv = [tiny_model_path, str(config.cache_dir), str(Path(__file__).parent)]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", str(len(first))]


def test_null_field_is_left_out_of_the_prompt(make_config):
    sql = (
        "SELECT llm('Q', title, genre) = llm('Q', title) FROM m WHERE genre IS NULL "
        "UNION ALL SELECT llm('Q', {'title': title, 'genre': NULL}) = llm('Q', title) FROM m"
    )
    rows, _s, _f = _run(make_config, sql)
    assert rows and all(r == "(True,)" for r in rows)


def test_register_on_a_plain_duckdb_connection(make_config):
    con = duckdb.connect()
    _load(con)
    llmudf.register(con, make_config())
    plain = sorted(con.sql("SELECT id, llm('Summarize', {'title': title}) FROM m").fetchall())
    con.close()
    rows, _s, _f = _run(make_config, "SELECT id, llm('Summarize', title) FROM m")
    assert sorted(map(repr, plain)) == rows


def test_explain_llm_reports_dedup_and_pushdown(make_config):
    con = llmudf.connect(config=make_config())
    _load(con)
    info = con.explain_llm("SELECT id, llm('S', title) FROM m WHERE year > 1991")
    con.close()
    (site,) = info.sites
    assert (site.site, site.num_rows, site.num_requests) == ("llm #1 in SELECT", 10, 6)
    assert site.pushed == ("filter year > 1991",)
    assert site.field_order == ("title",) and site.unit == "tokens"
    assert 0 < site.cached_units < site.prompt_units
    assert "rows 10 -> 6 prompts" in str(info)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT llm('Q', nosuch) FROM m", r"llm #1 in SELECT.*nosuch"),
        ("SELECT llm_choice('Q', title, genre) FROM m", r"llm_choice #1 in SELECT: choices"),
        ("SELECT llm(1, title) FROM m", r"llm #1 in SELECT: the instruction must be a string"),
        ("SELECT llm('Q', upper(title)) FROM m", r"llm #1 in SELECT: field #1 .* has no name"),
        ("SELECT llm('Q', title, {'max_tokens': -2}) FROM m", r"llm #1 in SELECT: bad option"),
    ],
)
def test_bad_calls_are_clear_errors_naming_the_call_site(make_config, sql, match):
    con = llmudf.connect(config=make_config())
    _load(con)
    with pytest.raises(LLMCallError, match=match):
        con.sql(sql).fetchall()
    con.close()


def test_model_that_fails_to_load_names_the_call_site(make_config, tmp_path):
    con = llmudf.connect(config=make_config(model=str(tmp_path / "no_such_model")))
    _load(con)
    with pytest.raises(LLMCallError, match=r"llm_filter #1 in WHERE: .*no_such_model"):
        con.sql("SELECT id FROM m WHERE llm_filter('Keep?', title)").fetchall()
    con.close()


def test_prompt_over_the_context_length_names_the_call_site(make_config):
    config = make_config(engine={"device": "cpu", "max_model_len": 64})
    con = llmudf.connect(config=config)
    _load(con)
    with pytest.raises(LLMCallError, match=r"llm #1 in SELECT: .*64"):
        con.sql("SELECT llm('Summarize', title) FROM m").fetchall()
    con.close()


def test_llm_json_answers_validate_against_a_flat_schema(make_config):
    """A flat object schema is enforced by the engine's JSON constraint, so even a random
    tiny model answers every row with a valid object."""
    import json

    schema = json.dumps(
        {
            "type": "object",
            "properties": {
                "kind": {"enum": ["film", "show"]},
                "seasons": {"type": "integer"},
                "hit": {"type": "boolean"},
            },
        }
    )
    con = llmudf.connect(config=make_config(cache=False, max_tokens=160))
    _load(con)
    rows = con.sql(f"SELECT id, llm_json('Describe', '{schema}', title) AS j FROM m").fetchall()
    con.close()
    assert len(rows) == 14
    for _id, text in rows:
        value = json.loads(text)
        assert value["kind"] in ("film", "show")
        assert isinstance(value["seasons"], int)
        assert isinstance(value["hit"], bool)
