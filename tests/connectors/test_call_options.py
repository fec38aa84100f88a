"""Per-call options in SQL: a misspelt or misplaced option is an error naming the call site,
a bad option value too; field structs whose keys only look like options stay fields. Real
DuckDB, real (tiny, random-init) engine."""

from __future__ import annotations

import duckdb
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError

ROWS = [(1, "a quiet film about a lighthouse", 5, "civic"), (2, "a loud one about cars", 7, "golf")]


def _load(con) -> None:
    con.execute("CREATE TABLE m (id INTEGER, title VARCHAR, speed INTEGER, model VARCHAR)")
    con.executemany("INSERT INTO m VALUES (?, ?, ?, ?)", ROWS)


def _rows(con, sql: str) -> list[tuple]:
    return sorted(con.sql(sql).fetchall())


@pytest.fixture(params=[True, False], ids=["whole-query", "rewrite-off"])
def con(request, make_config):
    con = llmudf.connect(config=make_config(rewrite=request.param))
    _load(con)
    yield con
    con.close()


BAD_CALLS = [
    (
        "{'max_tokens': 4, 'bogus': 1}",
        r"llm #1 in SELECT: the last struct mixes call option\(s\) \['max_tokens'\] with other "
        r"keys \['bogus'\]; pass the options in a struct of their own",
    ),
    (
        "{'max_token': 4}",
        r"llm #1 in SELECT: unknown option 'max_token'; did you mean 'max_tokens'\?",
    ),
    (
        "{'temprature': 0.5}",
        r"llm #1 in SELECT: unknown option 'temprature'; did you mean 'temperature'\?",
    ),
    ("{'Seed': 1}", r"llm #1 in SELECT: unknown option 'Seed'; did you mean 'seed'\?"),
    (
        "{'top_n': 5}",
        r"llm #1 in SELECT: unknown option 'top_n'; did you mean 'top_p' or 'top_k'\?",
    ),
    (
        "{'title2': title, 'seed': 3}",
        r"llm #1 in SELECT: the last struct mixes call option\(s\) \['seed'\]",
    ),
    (
        "{'max_tokens': 'abc'}",
        r"llm #1 in SELECT: bad option: max_tokens must be an integer >= 1, got 'abc'",
    ),
    (
        "{'max_tokens': 2.5}",
        r"llm #1 in SELECT: bad option: max_tokens must be an integer >= 1, got 2.5",
    ),
    (
        "{'max_tokens': 0}",
        r"llm #1 in SELECT: bad option: max_tokens must be an integer >= 1, got 0",
    ),
    (
        "{'max_tokens': -1}",
        r"llm #1 in SELECT: bad option: max_tokens must be an integer >= 1, got -1",
    ),
    ("{'max_tokens': true}", r"llm #1 in SELECT: bad option: max_tokens must be .* got True"),
    (
        "{'seed': -1}",
        r"llm #1 in SELECT: bad option: seed must be an integer in \[0, 2\*\*64 - 1\]",
    ),
    ("{'seed': 18446744073709551616}", r"llm #1 in SELECT: bad option: seed must be an integer in"),
    ("{'seed': 1.5}", r"llm #1 in SELECT: bad option: seed must be an integer in .* got 1.5"),
    (
        "{'temperature': 1e999}",
        r"llm #1 in SELECT: bad option: temperature must be a finite .* inf",
    ),
    ("{'temperature': -0.1}", r"llm #1 in SELECT: bad option: temperature must be a finite number"),
    ("{'temperature': 'hot'}", r"llm #1 in SELECT: bad option: temperature .* got 'hot'"),
    ("{'top_p': 0}", r"llm #1 in SELECT: bad option: top_p must be a number in \(0, 1\], got 0"),
    ("{'top_p': 1.5}", r"llm #1 in SELECT: bad option: top_p must be a number in \(0, 1\]"),
    ("{'top_k': -1}", r"llm #1 in SELECT: bad option: top_k must be an integer >= 0"),
    ("{'top_k': 2.5}", r"llm #1 in SELECT: bad option: top_k must be an integer >= 0 .* 2.5"),
    ("{'model': 3}", r"llm #1 in SELECT: bad option: model must be a model folder"),
    ("{'model': NULL}", r"llm #1 in SELECT: bad option: model must be a model path or name"),
    ("{'model': model}", r"llm #1 in SELECT: call options must be constants, not \['model'\]"),
]


@pytest.mark.parametrize(("options", "match"), BAD_CALLS, ids=[o for o, _m in BAD_CALLS])
def test_bad_option_structs_are_errors_naming_the_call_site(con, options, match):
    with pytest.raises(LLMCallError, match=match):
        con.sql(f"SELECT id, llm('Q', title, {options}) FROM m").fetchall()


def test_a_bad_option_in_where_names_that_clause(con):
    sql = "SELECT id FROM m WHERE llm_filter('Keep?', title, {'max_tokns': 2})"
    with pytest.raises(LLMCallError, match=r"llm_filter #1 in WHERE: .*did you mean 'max_tokens'"):
        con.sql(sql).fetchall()


@pytest.mark.parametrize(
    ("struct", "columns"),
    [
        ("{'speed': speed}", "speed"),  # a near miss of seed, but a column
        ("{'model': model, 'speed': speed}", "model, speed"),  # an option name, but a column
        ("{'id': id, 'speed': speed}", "id, speed"),
    ],
)
def test_field_structs_that_only_look_like_options_stay_fields(con, struct, columns):
    as_struct = _rows(con, f"SELECT id, llm('Q', title, {struct}) FROM m")
    as_columns = _rows(con, f"SELECT id, llm('Q', title, {columns}) FROM m")
    assert as_struct == as_columns
    assert as_struct != _rows(con, "SELECT id, llm('Q', title) FROM m")  # the field is in


def test_a_misspelt_option_moved_before_the_fields_is_a_field(con):
    # the error's advice: a struct that is not the last argument is always fields
    moved = _rows(con, "SELECT id, llm('Q', {'max_token': 4}, title) FROM m")
    named = _rows(con, "SELECT id, llm('Q', {'max_token': 4, 'title': title}) FROM m")
    assert moved == named


def test_options_from_sql_decimals_and_big_seeds_decode_the_same_on_both_paths(make_config):
    # DuckDB hands the per-chunk UDF 0.5 and an integer past BIGINT as DECIMAL
    sql = (
        "SELECT id, llm('Q', title, {'max_tokens': 3, 'temperature': 0.5, "
        "'seed': 18446744073709551615}) FROM m"
    )
    answers = []
    for rewrite in (True, False):
        con = llmudf.connect(config=make_config(rewrite=rewrite, cache=False))
        _load(con)
        answers.append(_rows(con, sql))
        con.close()
    assert answers[0] == answers[1]
    assert all(isinstance(a, str) for _i, a in answers[0])


def test_plain_duckdb_connection_reads_options_per_chunk(make_config):
    con = duckdb.connect()
    _load(con)
    llmudf.register(con, make_config())
    short = _rows(con, "SELECT id, llm('Q', {'title': title}, {'max_tokens': 2}) FROM m")
    assert short != _rows(con, "SELECT id, llm('Q', {'title': title}) FROM m")
    assert all(len(a) <= 2 for _i, a in short)  # the tiny tokenizer: a token is a byte
    with llmudf.connect(config=make_config()) as whole:
        _load(whole)
        assert short == _rows(whole, "SELECT id, llm('Q', title, {'max_tokens': 2}) FROM m")
    sql = "SELECT id, llm('Q', {'title': title}, {'max_tokens': 'abc'}) FROM m"
    with pytest.raises(duckdb.Error, match=r"llm \(per chunk\): bad option: max_tokens must be"):
        con.sql(sql).fetchall()
    # a column with one value in the chunk is not taken for an option (nor is a near miss)
    one_row = "SELECT id, llm('Q', {'title': title}, {'speed': speed}) FROM m WHERE id = 1"
    plain = "SELECT id, llm('Q', {'title': title, 'speed': speed}) FROM m WHERE id = 1"
    assert _rows(con, one_row) == _rows(con, plain)
    con.close()
