"""The whole-query rewrite against the per-chunk UDF path, in a real DuckDB.

Both paths answer with the same deterministic function of the rendered fields (so answers
vary row to row and no model is needed): any difference is the rewrite's fault.
"""

from __future__ import annotations

import hashlib

import duckdb
import pyarrow as pa
import pytest

from llmudf.calls.functions import FUNCTIONS
from llmudf.calls.prompt import render_fields
from llmudf.optimizer.rewrite import AnswerStep, Probe, QueryRewrite, UnsupportedQuery
from llmudf.runtime.query_driver import drive


def _oracle(name: str, instruction: str, fields: list[tuple[str, object]]):
    digest = hashlib.sha256(f"{instruction}|{render_fields(fields)}".encode()).digest()[0]
    if name == "llm_filter":
        return digest % 3 != 0
    if name == "llm_score":
        return float(1 + digest % 5)
    if name == "llm_choice":
        return ["red", "green"][digest % 2]
    return f"a{digest % 7}"


def _udf(name: str, calls: list):
    def udf(*args):
        calls.append(len(args[0]))
        instruction = args[0].to_pylist()
        rest = list(args[1:])
        if FUNCTIONS[name].const_arg:
            rest.pop(0)
        rows = rest[0].to_pylist() if rest else [{}] * len(args[0])
        return pa.array(
            [_oracle(name, i, list(r.items())) for i, r in zip(instruction, rows, strict=True)],
            FUNCTIONS[name].arrow_type,
        )

    return udf


UDF_CALLS: list[int] = []  # rows per per-chunk UDF call


@pytest.fixture
def con():
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE movies AS SELECT * FROM (VALUES "
        "(1, 'Up', 'Animation', 2009, 'PG'), (2, 'Heat', 'Crime', 1995, 'R'), "
        "(3, 'Up', 'Animation', 2009, 'PG'), (4, 'Alien', 'Horror', 1979, NULL), "
        "(5, 'Cars', 'Animation', 2006, 'G'), (6, 'Saw', 'Horror', 2004, 'R'), "
        "(7, 'Jaws', NULL, 1975, 'PG'), (8, 'Heat', 'Crime', 1995, 'R'), "
        "(9, 'Big', 'Comedy', 1988, 'PG'), (10, 'Fargo', 'Crime', 1996, 'R')"
        ") v(id, title, genre, year, rating)"
    )
    con.execute(
        "CREATE TABLE reviews AS SELECT * FROM (VALUES (1, 'great'), (2, 'tense'), "
        "(4, 'scary'), (5, 'fun'), (9, 'sweet'), (10, 'odd')) v(id, review)"
    )
    UDF_CALLS.clear()
    for name, f in FUNCTIONS.items():
        con.create_function(
            name,
            _udf(name, UDF_CALLS),
            None,
            f.sql_type,
            type="arrow",
            null_handling="special",
            side_effects=True,  # as llmudf registers them: never folded or shared
        )
    yield con
    con.close()


def _rewritten(con, sql: str, assume_pass: bool = False):
    """(final SQL, [AnsweredCall, ...]) of the rewrite driven through `con`, the oracle
    answering."""

    def answer(step, call) -> pa.Array:
        site = step.site
        instructions = call.instruction
        if isinstance(instructions, str):
            instructions = [instructions] * call.num_tuples
        rows = call.fields.to_pylist()
        answers = [
            _oracle(site.name, str(i), list(row.items()))
            for i, row in zip(instructions, rows, strict=True)
        ]
        return pa.array(answers, site.spec.function.arrow_type)

    def run_sql(sql: str) -> pa.Table:
        return con.sql(sql).to_arrow_table()

    done = drive(QueryRewrite(sql, "duckdb"), run_sql, answer, con.register, assume_pass)
    return done.sql, list(done.calls)


SHAPES = [
    "SELECT id, llm('Summarize', title, genre) FROM movies",
    "SELECT id, title FROM movies WHERE year > 1990 AND llm_filter('Kids?', title, rating)",
    "SELECT id FROM movies WHERE llm_filter('A?', title) OR year < 1980",
    "SELECT id FROM movies WHERE llm_filter('A?', title) AND llm_filter('B?', genre) AND id > 1",
    "SELECT genre, AVG(llm_score('Rate', title)) AS s, COUNT(*) FROM movies GROUP BY genre",
    "SELECT m.id, llm('Mood?', title, review) FROM movies m JOIN reviews r ON m.id = r.id",
    "WITH kids AS (SELECT * FROM movies WHERE llm_filter('Kids?', title)) "
    "SELECT id, llm_choice('Color?', ['red', 'green'], genre) AS c FROM kids",
    "SELECT id, x FROM (SELECT id, llm('S', {'t': title, 'y': year}) AS x FROM movies "
    "WHERE year > 1980) sub WHERE id < 9",
    "SELECT id, llm('S', title) FROM movies ORDER BY year DESC, id LIMIT 3",
    "SELECT *, llm('S', genre, rating) AS g FROM movies WHERE rating IS NOT NULL",
    "SELECT DISTINCT llm('S', title) AS t FROM movies",
    "SELECT id, llm('Outer', {'inner': llm('Inner', title)}) FROM movies",
    "SELECT llm('S', genre) AS g, COUNT(*) FROM movies GROUP BY ALL HAVING COUNT(*) > 1",
    "SELECT id, llm(title, genre) FROM movies",  # the instruction is a column
    "SELECT id FROM movies WHERE id IN (SELECT id FROM reviews WHERE llm_filter('Good?', review))",
    "SELECT id, llm('S', title) FROM movies UNION ALL SELECT id, llm('S', review) FROM reviews",
    # aggregating scopes: a call in WHERE is per row, a GROUP BY call is a key
    "SELECT count(*) FROM movies WHERE year > 1990 AND llm_filter('K?', title)",
    "SELECT genre, count(*) FROM movies WHERE llm_filter('K?', title) GROUP BY genre",
    "SELECT llm_choice('C', ['red', 'green'], genre) AS c, count(*) FROM movies "
    "GROUP BY llm_choice('C', ['red', 'green'], genre)",
    "SELECT llm_choice('C', ['red', 'green'], genre) AS c, count(*) FROM movies GROUP BY c",
    "SELECT llm_choice('C', ['red', 'green'], genre) AS c, count(*) FROM movies GROUP BY 1",
    "SELECT upper(llm('S', genre)) AS c, count(*) FROM movies GROUP BY c",
    "SELECT count(*) FILTER (WHERE llm_filter('K?', title)) AS n FROM movies",
    "SELECT genre, count(*) FILTER (WHERE llm_filter('K?', title)) FROM movies "
    "GROUP BY ROLLUP (genre)",
    "SELECT genre FROM movies GROUP BY genre HAVING llm_filter('Fun?', genre)",
    "SELECT rating, genre, count(*) FROM movies "
    "GROUP BY GROUPING SETS ((rating), (llm_choice('C', ['red', 'green'], genre), genre))",
    "SELECT id, llm(NULL, title) AS a FROM movies",
    "SELECT llm('Capital?', {'country': 'France'}) AS a",
]


@pytest.mark.parametrize("sql", SHAPES)
def test_rewrite_returns_what_the_udf_path_returns(con, sql):
    udf_sql = QueryRewrite(sql, "duckdb").udf_sql()
    expected = sorted(map(repr, con.sql(udf_sql).fetchall()))
    UDF_CALLS.clear()
    final, calls = _rewritten(con, sql)
    got = sorted(map(repr, con.sql(final).fetchall()))
    assert got == expected
    assert calls, "the rewrite answered no call site"
    assert sum(UDF_CALLS) == 0, "a row missed the answers and fell back to the UDF"


def test_rows_are_deduplicated_and_filters_pushed_below(con):
    sql = "SELECT id FROM movies WHERE year > 1990 AND llm_filter('Kids?', title, rating)"
    _final, (call,) = _rewritten(con, sql)
    assert (call.num_rows, call.num_distinct) == (7, 5)  # Up x2, Heat x2 among 7 rows after 1990
    assert call.step.pushed == ("filter year > 1990",)


def test_second_llm_filter_sees_only_survivors_of_the_first(con):
    sql = "SELECT id FROM movies WHERE llm_filter('A?', title) AND llm_filter('Fun?', genre)"
    _final, (first, second) = _rewritten(con, sql)
    assert first.step.site.fields[0][0] == "genre"  # 5 distinct genres (NULL too) before 7 titles
    genres = [g for (g,) in con.sql("SELECT genre FROM movies").fetchall()]
    survivors = sum(_oracle("llm_filter", "Fun?", [("genre", g)]) for g in genres)
    assert (first.num_rows, second.num_rows) == (10, survivors)
    assert 0 < survivors < 10


def test_limit_is_pushed_below_the_select_call(con):
    _final, (call,) = _rewritten(con, "SELECT id, llm('S', title) FROM movies ORDER BY id LIMIT 3")
    assert (call.num_rows, call.num_distinct) == (3, 2)  # Up, Heat, Up
    assert call.step.pushed == ("limit 3",)


def test_limit_over_an_llm_order_is_not_pushed(con):
    sql = "SELECT id, llm('S', title) AS a FROM movies ORDER BY a LIMIT 2"
    _final, calls = _rewritten(con, sql)
    assert calls[0].num_rows == 10


def test_canonical_form_names_fields(con):
    rewrite = QueryRewrite("SELECT llm_choice('C', ['a', 'b'], title, m.year) FROM movies m")
    assert rewrite.udf_sql() == (
        "SELECT LLM_CHOICE('C', ['a', 'b'], {'title': title, 'year': m.year}) "
        """AS "llm_choice('C', ['a', 'b'], title, m.year)" FROM movies AS m"""
    )  # an unaliased call keeps the column name it has unrewritten
    assert [s.label for s in rewrite.sites] == ["llm_choice #1 in SELECT"]


def test_spark_dialect_renders_the_same_plan():
    rewrite = QueryRewrite("SELECT llm('S', title) FROM movies WHERE year > 1990", "spark")
    assert (
        rewrite.udf_sql()
        == "SELECT LLM('S', STRUCT(title AS `title`)) AS `llm('S', title)` FROM movies "
        "WHERE year > 1990"
    )


def test_unsupported_shapes_say_so(con):
    with pytest.raises(UnsupportedQuery, match="JOIN"):
        _rewritten(
            con, "SELECT 1 FROM movies m JOIN reviews r ON llm_filter('Same?', title, review)"
        )
    for sql in (
        "SELECT genre, llm('S', {'t': string_agg(title)}) FROM movies GROUP BY genre",
        "SELECT genre, llm('O', {'i': llm('I', genre)}) FROM movies GROUP BY genre",
    ):
        with pytest.raises(UnsupportedQuery, match="an argument is an aggregate"):
            _rewritten(con, sql)


def test_select_without_from_runs_over_one_row(con):
    sql = "SELECT llm('Capital?', {'country': 'France'}) AS a"
    final, calls = _rewritten(con, sql)
    assert [c.num_distinct for c in calls] == [1]
    assert con.sql(final).fetchall() == con.sql(QueryRewrite(sql).udf_sql()).fetchall()
    assert UDF_CALLS == [1]  # the reference run only: the final query found the answer


def test_call_on_a_group_key_is_looked_up_once_per_group(con):
    sql = "SELECT genre, llm('S', genre) AS g, COUNT(*) AS n FROM movies GROUP BY genre"
    expected = sorted(map(repr, con.sql(QueryRewrite(sql).udf_sql()).fetchall()))
    final, _sent = _rewritten(con, sql)
    assert sorted(map(repr, con.sql(final).fetchall())) == expected
    assert "ANY_VALUE" in final


def test_the_plan_runs_nothing_and_probe_counts_decide_the_filter_order():
    sql = "SELECT id FROM movies WHERE llm_filter('A?', title) AND llm_filter('B?', genre)"
    rewrite = QueryRewrite(sql, "duckdb")
    for counts, first in (((1, 50), "A?"), ((50, 1), "B?")):
        steps = rewrite.steps()
        probes = [next(steps), steps.send(counts[0])]
        assert all(isinstance(p, Probe) and "COUNT(*)" in p.sql for p in probes)
        answer = steps.send(counts[1])
        assert isinstance(answer, AnswerStep) and answer.site.instruction == first
        second = steps.send(None)
        assert answer.table in second.args_sql  # runs on the first filter's survivors
        with pytest.raises(StopIteration) as stop:
            steps.send(None)
        assert answer.table in stop.value.value and second.table in stop.value.value
    assert rewrite.udf_sql() == QueryRewrite(sql, "duckdb").udf_sql()  # its tree is untouched


@pytest.mark.parametrize(
    ("dialect", "fallback"),
    [
        ("duckdb", "LLM(CASE WHEN __llm_1.__llm_found THEN NULL ELSE 'S' END, CASE WHEN "
         "__llm_1.__llm_found THEN NULL ELSE {'title': title} END)"),
        ("spark", "LLM(IF(__llm_1.__llm_found, NULL, 'S'), IF(__llm_1.__llm_found, NULL, "
         "STRUCT(title AS `title`)))"),
    ],
)  # fmt: skip
def test_found_rows_pass_nulls_to_the_per_chunk_fallback(dialect, fallback):
    steps = QueryRewrite("SELECT llm('S', title) AS s FROM movies", dialect).steps()
    next(steps)
    with pytest.raises(StopIteration) as stop:
        steps.send(None)
    assert fallback in stop.value.value


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("SELECT llm('S', {'r': random()}) FROM movies", "duckdb"),
        ("SELECT ID, llm('S', Title) FROM movies WHERE rand() < 0.5", "spark"),
        ("SELECT llm('S', Title), monotonically_increasing_id() FROM movies", "spark"),
    ],
)
def test_a_nondeterministic_query_is_not_rewritten(sql, dialect):
    with pytest.raises(UnsupportedQuery, match="differs between the stages"):
        QueryRewrite(sql, dialect).steps()
