"""A broad equivalence suite (issue #10): every query shape gives the same result through the
whole-query rewrite as through the per-chunk UDFs (`Config(rewrite=False)`), answered by the
hash oracle (tests/connectors/conftest.py), a deterministic fake model whose answers vary.

Each shape also records which path the rewrite took (`con.last_fallback`);
`test_path_summary` prints the table (run it with `-s`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pytest

import llmudf
from llmudf.calls.config import Config

# ---- data ----------------------------------------------------------------------------------

TITLES = [
    "Heat", "Up", "Alien", "Jaws", "Fargo", "Brazil", "Rocky", "Psycho", "Vertigo",
    "Amelie", "Gravity", "Memento", "Tampopo", "Solaris", "Ran", "Stalker", "Ikiru", "Zodiac",
]  # fmt: skip
GENRES = ["drama", "comedy", "horror", "sci-fi", "thriller", None]
DIRECTORS = ["Mann", "Lynch", "Kurosawa", "Varda"]
TEXTS = [
    "loved it", "too long", "a classic", "fell asleep", "great score", "weak ending",
    "loved it", "stunning", "meh", "a classic", "funny", "scary",
]  # fmt: skip
REVIEWERS = ["ann", "bob", "cy", "dee", "eve"]


def _movie_rows() -> list[tuple]:
    """48 rows over 18 (title, genre, year) tuples: duplicates, so dedup matters; director and
    budget mostly NULL, notes all NULL."""
    rows = []
    for i in range(48):
        base = i % 18
        rating = None if i % 5 == 0 else round(1 + (i * 37 % 90) / 10, 1)
        director = DIRECTORS[i % 4] if i % 3 == 0 else None
        budget = 10 + i if i % 4 == 1 else None
        rows.append((i, TITLES[base], GENRES[base % 6], 1975 + 2 * base, rating, director,
                     budget, None))  # fmt: skip
    return rows


def _review_rows() -> list[tuple]:
    """40 reviews: ten movies have two, some have none, a few name no movie; some texts NULL."""
    rows = []
    for j in range(40):
        movie_id = 50 + j if j % 13 == 12 else j * 7 % 30
        text = None if j % 9 == 4 else TEXTS[j % 12]
        rows.append((movie_id, REVIEWERS[j % 5], text, 1975 + j * 3 % 50))
    return rows


def _values(rows: list[tuple]) -> str:
    def lit(v):
        if v is None:
            return "NULL"
        return f"'{v}'" if isinstance(v, str) else repr(v)

    return ", ".join("(" + ", ".join(lit(v) for v in row) + ")" for row in rows)


LOAD = [
    "CREATE TABLE movies (id INTEGER, title VARCHAR, genre VARCHAR, year INTEGER, "
    "rating DOUBLE, director VARCHAR, budget INTEGER, notes VARCHAR)",
    f"INSERT INTO movies VALUES {_values(_movie_rows())}",
    "CREATE TABLE reviews (movie_id INTEGER, reviewer VARCHAR, text VARCHAR, year INTEGER)",
    f"INSERT INTO reviews VALUES {_values(_review_rows())}",
]
MOVIE_COLUMNS = ["id", "title", "genre", "year", "rating", "director", "budget", "notes"]

MOOD = "['happy', 'sad', 'tense']"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "tone": {"enum": ["dark", "light"]},
            "stars": {"type": "integer"},
            "hit": {"type": "boolean"},
            "tag": {"type": "string"},
        },
    }
)


# ---- shapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One query shape. `sql`: a statement, or statements run in order (the last one's result
    is compared); `api`: how the last one runs ("sql": con.sql, "execute": con.execute,
    "dataframe": con.sql with a DataFrame `df` in the caller's scope); `after`: a query whose
    rows are compared too (a table a statement changed); `ref`: other SQL for the per-chunk
    side; `ordered`: the query has a total ORDER BY; `single`: the oracle may see one answer;
    `check(rows)`: more assertions on the rewrite's rows."""

    id: str
    sql: str | tuple[str, ...]
    api: str = "sql"
    params: list | None = None
    after: str | None = None
    ref: str | tuple[str, ...] | None = None
    ordered: bool = False
    single: bool = False
    check: Callable[[list[tuple]], None] | None = None


def _all_null(rows: list[tuple]) -> None:
    assert rows and all(r[-1] is None for r in rows)


def _llm_varies(rows: list[tuple]) -> None:
    assert len({r[-1] for r in rows}) >= 2


S = Shape
SHAPES = [
    # -- the five functions, in SELECT and WHERE
    S("llm", "SELECT id, llm('Summarize', title, genre) AS a FROM movies", check=_llm_varies),
    S("llm_filter", "SELECT id, llm_filter('Good?', title) AS f FROM movies", check=_llm_varies),
    S("llm_choice", f"SELECT id, llm_choice('Mood?', {MOOD}, title) AS c FROM movies",
      check=_llm_varies),
    S("llm_score", "SELECT id, llm_score('Rate it', title, year) AS s FROM movies",
      check=_llm_varies),
    S("llm_json", f"SELECT id, llm_json('Describe', '{SCHEMA}', title) AS j FROM movies",
      check=_llm_varies),
    S("llm_json_extract",
      f"SELECT id, llm_json('Describe', '{SCHEMA}', title) ->> 'tone' AS tone FROM movies"),
    S("where_filter", "SELECT id, title FROM movies WHERE llm_filter('Keep?', title)"),
    S("where_and_relational",
      "SELECT id FROM movies WHERE year > 1990 AND llm_filter('Keep?', title, genre)"),
    S("where_or", "SELECT id FROM movies WHERE year < 1985 OR llm_filter('Keep?', title)"),
    S("where_two_filters",
      "SELECT id FROM movies WHERE llm_filter('A?', title) AND llm_filter('B?', genre)"),
    S("where_not_filter", "SELECT id FROM movies WHERE NOT llm_filter('Keep?', title)"),
    S("where_choice_eq",
      f"SELECT id FROM movies WHERE llm_choice('Mood?', {MOOD}, title) = 'sad'"),
    S("where_choice_in",
      f"SELECT id FROM movies WHERE llm_choice('Mood?', {MOOD}, title) IN ('sad', 'tense')"),
    S("where_score_between",
      "SELECT id FROM movies WHERE llm_score('Rate', title) BETWEEN 2 AND 4"),
    S("instruction_column", "SELECT id, llm(genre, title) AS a FROM movies"),
    S("instruction_only", "SELECT id, llm('Say hi') AS a FROM movies", single=True),
    S("options_max_tokens", "SELECT id, llm('S', title, {'max_tokens': 3}) AS a FROM movies"),
    S("options_temperature_seed",
      "SELECT id, llm('S', title, {'temperature': 0.7, 'seed': 1}) AS a FROM movies"),
    S("struct_fields",
      "SELECT id, llm('S', {'t': title, 'decade': year // 10 * 10}) AS a FROM movies"),
    S("typed_fields", "SELECT id, llm('S', id, rating, {'new': year > 1990}, "
      "{'d': make_date(year, 1, 1)}, {'l': [genre, director]}) AS a FROM movies"),
    S("same_call_twice", "SELECT id, llm('S', title) AS a, llm('S', title) AS b FROM movies"),
    S("no_from", "SELECT llm('x', {'k': 'const'}) AS a", single=True),
    S("null_instruction", "SELECT id, llm(NULL, title) AS a FROM movies", single=True,
      check=_all_null),
    S("null_heavy_fields", "SELECT id, llm('S', director, budget) AS a FROM movies"),
    S("all_null_field", "SELECT id, llm('S', notes) AS a FROM movies", single=True),
    S("all_null_plus_field", "SELECT id, llm('S', title, notes) AS a FROM movies"),
    S("filter_all_null", "SELECT count(*) FROM movies WHERE llm_filter('Keep?', notes)",
      single=True),
    S("select_star", "SELECT *, llm('S', title) AS a FROM movies"),
    S("star_qualified", "SELECT m.*, llm('S', m.title) AS a FROM movies m"),
    S("star_exclude", "SELECT * EXCLUDE (notes), llm('S', title) AS a FROM movies"),
    S("star_replace", "SELECT * REPLACE (llm('S', title) AS title) FROM movies"),
    S("star_filter", "SELECT * FROM movies WHERE llm_filter('Keep?', title)"),
    # -- aggregates
    S("count_where_filter",
      "SELECT count(*) FROM movies WHERE year > 1985 AND llm_filter('Keep?', title)"),
    S("group_count_filter",
      "SELECT genre, count(*) FROM movies WHERE llm_filter('Keep?', title) GROUP BY genre"),
    S("agg_all", "SELECT count(llm('S', title)), sum(llm_score('R', title)), "
      "avg(llm_score('R', title)), min(llm('S', title)), max(llm_score('R', year)) FROM movies"),
    S("count_filter_clause", "SELECT count(*) FILTER (WHERE llm_filter('Keep?', title)) AS n, "
      "count(*) AS total FROM movies"),
    S("sum_case_filter",
      "SELECT sum(CASE WHEN llm_filter('Keep?', title) THEN 1 ELSE 0 END) FROM movies"),
    S("avg_score_by_group",
      "SELECT genre, avg(llm_score('R', title)) AS s, count(*) FROM movies GROUP BY genre"),
    S("having_on_answer", "SELECT genre, avg(llm_score('R', title)) AS s FROM movies "
      "GROUP BY genre HAVING avg(llm_score('R', title)) > 2.5"),
    S("having_filter_on_key",
      "SELECT genre, count(*) FROM movies GROUP BY genre HAVING llm_filter('Good?', genre)"),
    S("group_key_call", "SELECT genre, llm('Describe', genre) AS d FROM movies GROUP BY genre"),
    S("group_by_choice", f"SELECT llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      f"FROM movies GROUP BY llm_choice('Mood?', {MOOD}, title)"),
    S("group_by_alias", f"SELECT llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      "FROM movies GROUP BY mood"),
    S("group_by_ordinal", f"SELECT llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      "FROM movies GROUP BY 1"),
    S("group_by_all", f"SELECT genre, llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      "FROM movies GROUP BY ALL"),
    S("grouping_sets", f"SELECT genre, llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      "FROM movies GROUP BY GROUPING SETS ((genre), (mood), ())"),
    S("rollup", "SELECT genre, llm_filter('Keep?', title) AS k, count(*) FROM movies "
      "GROUP BY ROLLUP (genre, k)"),
    S("cube", f"SELECT genre, llm_choice('Mood?', {MOOD}, title) AS mood, count(*) "
      "FROM movies GROUP BY CUBE (genre, mood)"),
    S("string_agg_answers", "SELECT genre, string_agg(llm('S', title), ',' ORDER BY id) "
      "FROM movies GROUP BY genre"),
    S("count_distinct_answer",
      f"SELECT count(DISTINCT llm_choice('Mood?', {MOOD}, title)) FROM movies"),
    S("call_over_aggregate",
      "SELECT genre, llm('Summarize', {'n': sum(id)}) AS a FROM movies GROUP BY genre"),
    # -- DISTINCT
    S("distinct_answer", f"SELECT DISTINCT llm_choice('Mood?', {MOOD}, title) FROM movies"),
    S("distinct_rows", "SELECT DISTINCT title, llm('S', title) FROM movies"),
    S("distinct_on", "SELECT DISTINCT ON (genre) genre, id, llm('S', title) AS a "
      "FROM movies ORDER BY genre, id", ordered=True),
    # -- windows, QUALIFY
    S("window_over_answer",
      "SELECT id, sum(llm_score('R', title)) OVER (PARTITION BY genre) AS s FROM movies"),
    S("window_partition_by_answer", f"SELECT id, row_number() OVER (PARTITION BY "
      f"llm_choice('Mood?', {MOOD}, title) ORDER BY id) AS n FROM movies"),
    S("window_order_by_answer",
      "SELECT id, rank() OVER (ORDER BY llm_score('R', title), id) AS r FROM movies"),
    S("window_frame", "SELECT id, avg(llm_score('R', title)) OVER (ORDER BY id "
      "ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) AS s FROM movies"),
    S("window_lag_answer",
      "SELECT id, lag(llm('S', title)) OVER (ORDER BY id) AS prev FROM movies"),
    S("qualify_on_answer", "SELECT id, genre, llm_score('R', title) AS s FROM movies "
      "QUALIFY row_number() OVER (PARTITION BY genre ORDER BY s DESC, id) = 1"),
    S("qualify_filter", "SELECT id FROM movies "
      "QUALIFY count(*) OVER (PARTITION BY genre) > 2 AND llm_filter('Keep?', title)"),
    S("window_partition_by_answer_alias", f"SELECT id, row_number() OVER (PARTITION BY mood "
      f"ORDER BY id) AS n FROM (SELECT id, llm_choice('Mood?', {MOOD}, title) AS mood "
      "FROM movies)"),
    S("window_order_by_answer_alias", "SELECT id, rank() OVER (ORDER BY s, id) AS r "
      "FROM (SELECT id, llm_score('R', title) AS s FROM movies)"),
    # -- ORDER BY, LIMIT, OFFSET
    S("order_by_answer", "SELECT id, llm_score('R', title) AS s FROM movies ORDER BY s DESC, id",
      ordered=True),
    S("order_by_call_only", "SELECT id FROM movies ORDER BY llm('S', title), id", ordered=True),
    S("limit", "SELECT id, llm('S', title) AS a FROM movies ORDER BY id LIMIT 5", ordered=True),
    S("limit_offset", "SELECT id, llm('S', title) AS a FROM movies ORDER BY id LIMIT 5 OFFSET 3",
      ordered=True),
    S("limit_order_by_answer", "SELECT id, llm_score('R', title) AS s FROM movies "
      "ORDER BY s DESC, id LIMIT 7", ordered=True),
    S("filter_limit", "SELECT id, llm('S', title) AS a FROM movies "
      "WHERE llm_filter('Keep?', title) ORDER BY id LIMIT 4", ordered=True),
    S("limit_order_by_other_column", "SELECT id, llm('S', title) AS a FROM movies "
      "WHERE year > 1980 ORDER BY rating DESC NULLS LAST, id LIMIT 6", ordered=True),
    S("limit_order_by_ordinal", "SELECT id, llm('S', title) AS a FROM movies "
      "ORDER BY 2, 1 LIMIT 6", ordered=True),
    S("limit_alias_shadows_column", "SELECT id, llm('S', title) AS year FROM movies "
      "ORDER BY year, id LIMIT 6", ordered=True),
    S("limit_zero", "SELECT id, llm('S', title) AS a FROM movies ORDER BY id LIMIT 0",
      single=True),
    S("limit_in_subquery", "SELECT id FROM (SELECT id, title FROM movies ORDER BY id LIMIT 20) "
      "WHERE llm_filter('Keep?', title)"),
    S("distinct_limit", "SELECT DISTINCT genre, llm('D', genre) AS d FROM movies "
      "ORDER BY genre LIMIT 3", ordered=True),
    # -- set operations
    S("union", "SELECT id, llm('S', title) FROM movies WHERE year < 1995 "
      "UNION SELECT movie_id, llm('S', text) FROM reviews"),
    S("union_all", "SELECT llm_choice('Mood?', " + MOOD + ", title) FROM movies "
      "UNION ALL SELECT llm_choice('Mood?', " + MOOD + ", text) FROM reviews"),
    S("intersect", "SELECT title FROM movies WHERE llm_filter('A?', title) "
      "INTERSECT SELECT title FROM movies WHERE llm_filter('B?', title)"),
    S("intersect_all", "SELECT genre FROM movies WHERE llm_filter('A?', title) "
      "INTERSECT ALL SELECT genre FROM movies WHERE llm_filter('B?', title)"),
    S("except", "SELECT title FROM movies WHERE llm_filter('A?', title) "
      "EXCEPT SELECT title FROM movies WHERE llm_filter('B?', title)"),
    S("except_all", "SELECT genre FROM movies WHERE llm_filter('A?', title) "
      "EXCEPT ALL SELECT genre FROM movies WHERE llm_filter('B?', title)"),
    # -- CTEs and subqueries
    S("cte", "WITH k AS (SELECT * FROM movies WHERE llm_filter('Keep?', genre)) "
      "SELECT id, llm('Why?', {'t': title}) AS w FROM k"),
    S("nested_ctes", "WITH a AS (SELECT id, title, llm_score('R', title) AS s FROM movies), "
      "b AS (SELECT * FROM a WHERE s >= 2 AND llm_filter('Keep?', title)), "
      "c AS (SELECT id, s, llm('S', title) AS t FROM b) SELECT * FROM c"),
    S("cte_used_twice", "WITH a AS (SELECT id, llm_score('R', title) AS s FROM movies) "
      "SELECT x.id, y.id FROM a x JOIN a y ON x.s = y.s AND x.id < y.id"),
    S("subquery_in_from", "SELECT id, a FROM (SELECT id, llm('S', title) AS a FROM movies) s "
      "WHERE id IN (SELECT movie_id FROM reviews) ORDER BY id LIMIT 3", ordered=True),
    S("in_subquery_filter", "SELECT id FROM movies WHERE id IN "
      "(SELECT movie_id FROM reviews WHERE llm_filter('Positive?', text))"),
    S("in_subquery_outer_call",
      "SELECT id, llm('S', title) FROM movies WHERE id IN (SELECT movie_id FROM reviews)"),
    S("exists_correlated", "SELECT id FROM movies m WHERE EXISTS (SELECT 1 FROM reviews r "
      "WHERE r.movie_id = m.id AND llm_filter('Positive?', r.text))"),
    S("not_exists_correlated", "SELECT id FROM movies m WHERE NOT EXISTS (SELECT 1 FROM "
      "reviews r WHERE r.movie_id = m.id AND llm_filter('Positive?', r.text))"),
    S("scalar_subquery", "SELECT id, (SELECT count(*) FROM reviews "
      "WHERE llm_filter('Positive?', text)) AS n FROM movies"),
    S("scalar_subquery_correlated", "SELECT id, (SELECT max(llm_score('R', r.text)) "
      "FROM reviews r WHERE r.movie_id = m.id) AS s FROM movies m"),
    S("correlated_outer_field", "SELECT id, (SELECT llm('S', m.title, r.text) FROM reviews r "
      "WHERE r.movie_id = m.id ORDER BY r.reviewer, r.year LIMIT 1) AS a FROM movies m"),
    S("lateral", "SELECT m.id, l.a FROM movies m, LATERAL (SELECT llm('S', m.title, r.text) "
      "AS a FROM reviews r WHERE r.movie_id = m.id) l"),
    S("recursive_cte", "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
      "WHERE i < 5) SELECT i, llm('S', {'i': i}) FROM n"),
    # -- joins
    S("join_call_left", "SELECT m.id, r.reviewer, llm('S', m.title) AS a "
      "FROM movies m JOIN reviews r ON m.id = r.movie_id"),
    S("join_call_right", "SELECT m.id, r.reviewer, llm('S', r.text) AS a "
      "FROM movies m JOIN reviews r ON m.id = r.movie_id"),
    S("join_call_both", "SELECT m.id, r.reviewer, llm('S', m.title, r.text) AS a "
      "FROM movies m JOIN reviews r ON m.id = r.movie_id"),
    S("join_where_filter", "SELECT m.id, r.reviewer FROM movies m JOIN reviews r "
      "ON m.id = r.movie_id WHERE llm_filter('Match?', m.title, r.text)"),
    S("join_on_call", "SELECT m.id, r.reviewer FROM movies m JOIN reviews r "
      "ON m.id = r.movie_id AND llm_filter('Match?', m.title, r.text)"),
    S("left_join", "SELECT m.id, llm('S', m.title, r.text) AS a "
      "FROM movies m LEFT JOIN reviews r ON m.id = r.movie_id"),
    S("left_join_on_call", "SELECT m.id, r.reviewer FROM movies m LEFT JOIN reviews r "
      "ON m.id = r.movie_id AND llm_filter('Match?', m.title, r.text)"),
    S("right_join", "SELECT r.movie_id, llm('S', m.title, r.text) AS a "
      "FROM movies m RIGHT JOIN reviews r ON m.id = r.movie_id"),
    S("full_join", "SELECT m.id, r.movie_id, llm('S', m.title, r.text) AS a "
      "FROM movies m FULL JOIN reviews r ON m.id = r.movie_id"),
    S("cross_join", "SELECT m.id, r.reviewer, llm_filter('Match?', m.genre, r.text) AS f "
      "FROM (SELECT * FROM movies WHERE id < 6) m CROSS JOIN reviews r"),
    S("comma_join", "SELECT m.id, llm('S', m.title, r.reviewer) AS a FROM movies m, reviews r "
      "WHERE m.id = r.movie_id"),
    S("semi_join", "SELECT m.id, llm('S', m.title) AS a FROM movies m "
      "SEMI JOIN reviews r ON m.id = r.movie_id"),
    S("anti_join", "SELECT m.id, llm('S', m.title) AS a FROM movies m "
      "ANTI JOIN reviews r ON m.id = r.movie_id"),
    S("asof_join", "SELECT m.id, r.reviewer, llm('S', m.title, r.text) AS a FROM movies m "
      "ASOF JOIN reviews r ON m.id = r.movie_id AND m.year >= r.year"),
    S("positional_join", "SELECT a.id, llm('S', a.title, b.text) AS s FROM "
      "(SELECT id, title FROM movies ORDER BY id) a POSITIONAL JOIN "
      "(SELECT text FROM reviews ORDER BY movie_id, reviewer, year) b"),
    S("using_join", "SELECT id, llm('S', title, text) AS a FROM movies "
      "JOIN (SELECT movie_id AS id, text FROM reviews) r USING (id)"),
    S("natural_join", "SELECT id, llm('S', title, text) AS a FROM movies "
      "NATURAL JOIN (SELECT movie_id AS id, text FROM reviews) r"),
    S("star_using_join", "SELECT *, llm('S', title, text) AS a FROM movies "
      "JOIN (SELECT movie_id AS id, text FROM reviews) r USING (id)"),
    S("self_join", "SELECT a.id, b.id, llm('Same?', {'a': a.title, 'b': b.title}) AS s "
      "FROM movies a JOIN movies b ON a.genre = b.genre AND a.id < b.id AND a.id < 12"),
    # -- nested calls and expressions around calls
    S("case_branches", "SELECT id, CASE WHEN year > 1990 THEN llm('New', title) "
      "ELSE llm('Old', title) END AS a FROM movies"),
    S("case_condition",
      "SELECT id, CASE WHEN llm_filter('Keep?', title) THEN 'y' ELSE 'n' END FROM movies"),
    S("coalesce", "SELECT id, coalesce(director, llm('Guess the director', title)) FROM movies"),
    S("string_functions", "SELECT id, upper(llm('S', title)) || '-' || "
      "length(llm('T', genre)) AS a FROM movies"),
    S("cast_arithmetic",
      "SELECT id, CAST(llm_score('R', title) AS INTEGER) + 1 AS a FROM movies"),
    S("call_in_fields", f"SELECT id, llm('Explain', {{'mood': llm_choice('Mood?', {MOOD}, "
      "title), 'title': title}) AS a FROM movies"),
    S("call_as_instruction",
      "SELECT id, llm(llm('Ask a question about', genre), title) AS a FROM movies"),
    S("filter_on_call_fields",
      "SELECT id FROM movies WHERE llm_filter('Positive?', {'summary': llm('S', title)})"),
    S("json_in_fields", f"SELECT id, llm('S', {{'j': llm_json('D', '{SCHEMA}', title)}}) AS a "
      "FROM movies"),
    S("grouped_nested_call",
      "SELECT genre, llm('S', {'d': llm('D', genre)}) AS a FROM movies GROUP BY genre"),
    S("no_rows", "SELECT id, llm('S', title) AS a FROM movies WHERE false", single=True),
    S("uppercase_names", "SELECT ID, LLM_FILTER('Keep?', TITLE) AS f FROM MOVIES "
      "WHERE Llm_Score('R', Title) > 2"),
    S("quoted_identifier", "SELECT llm('S', \"Movie Title\") AS a "
      "FROM (SELECT title AS \"Movie Title\" FROM movies)"),
    S("quote_in_instruction", "SELECT id, llm('Is it ''good''?', title) AS a FROM movies"),
    S("where_json_field",
      f"SELECT id FROM movies WHERE llm_json('D', '{SCHEMA}', title) ->> 'tone' = 'dark'"),
    S("two_levels_of_subquery", "SELECT id, llm('Outer', a) AS b FROM (SELECT id, "
      "llm('Inner', title) AS a FROM (SELECT * FROM movies WHERE llm_filter('Keep?', genre)))"),
    S("options_differ_per_site", "SELECT id, llm('S', title, {'max_tokens': 2}) AS a, "
      "llm('S', title, {'max_tokens': 8}) AS b FROM movies"),
    # -- sources other than a table
    S("values_source",
      "SELECT v, llm('S', v) AS a FROM (VALUES ('a'), ('b'), ('a'), ('c')) t(v)"),
    S("unnest_source", "SELECT x, llm('S', x) AS a FROM (SELECT unnest(['p', 'q', 'p']) AS x)"),
    S("range_source", "SELECT i, llm('S', {'i': i}) AS a FROM range(10) t(i)"),
    S("dataframe", "SELECT id, llm('S', title) AS a FROM df", api="dataframe"),
    S("dataframe_join_filter", "SELECT r.reviewer, llm('S', df.title, r.text) AS a "
      "FROM df JOIN reviews r ON df.id = r.movie_id WHERE llm_filter('Keep?', df.genre)",
      api="dataframe"),
    # -- PIVOT / UNPIVOT
    S("pivot", f"PIVOT (SELECT genre, llm_choice('Mood?', {MOOD}, title) AS mood FROM movies) "
      "ON mood IN ('happy', 'sad', 'tense') USING count(*) GROUP BY genre"),
    S("unpivot", "UNPIVOT (SELECT id, llm('A', title) AS a, llm('B', title) AS b FROM movies) "
      "ON a, b INTO NAME k VALUE v"),
    S("select_from_pivot", "SELECT * FROM (PIVOT (SELECT genre, llm_filter('Keep?', title) "
      "AS k FROM movies) ON k IN (true, false) USING count(*) GROUP BY genre) p"),
    # -- statements that change tables (the table is compared afterwards)
    S("ctas", "CREATE TABLE out AS SELECT id, llm('S', title) AS a FROM movies",
      api="execute", after="SELECT * FROM out"),
    S("insert_select", ("CREATE TABLE out (id INTEGER, a VARCHAR)",
      "INSERT INTO out SELECT id, llm('S', title) FROM movies WHERE llm_filter('Keep?', genre)"),
      api="execute", after="SELECT * FROM out"),
    S("insert_values", ("CREATE TABLE out (id INTEGER, a VARCHAR)",
      "INSERT INTO out VALUES (1, llm('x', {'k': 'one'})), (2, llm('x', {'k': 'two'}))"),
      api="execute", after="SELECT * FROM out"),
    S("update_set", "UPDATE movies SET title = llm('Rename', title) WHERE year > 1990",
      api="execute", after="SELECT * FROM movies"),
    S("update_where", "UPDATE movies SET rating = 0 WHERE llm_filter('Bad?', title)",
      api="execute", after="SELECT * FROM movies"),
    S("delete_where", "DELETE FROM movies WHERE llm_filter('Drop?', title, genre)",
      api="execute", after="SELECT * FROM movies"),
    S("create_view", ("CREATE VIEW v AS SELECT id, llm('S', title) AS a FROM movies",
      "SELECT * FROM v")),
    # -- parameters
    S("params_qmark_execute", "SELECT id, llm('S', title) AS a FROM movies WHERE year > ?",
      api="execute", params=[1990]),
    S("params_dollar_sql", "SELECT id, llm('S', title) AS a FROM movies "
      "WHERE year > $1 AND genre <> $2", params=[1980, "drama"]),
    S("params_qmark_sql_filter",
      "SELECT id FROM movies WHERE year > ? AND llm_filter('Keep?', title)", params=[1985]),
    S("param_in_fields", "SELECT id, llm('S', title, {'since': $1}) AS a FROM movies",
      params=[1990]),
    S("param_in_fields_execute",
      "SELECT id, llm_filter('Keep?', title, {'since': ?}) AS a FROM movies",
      api="execute", params=[1990]),
    # -- multi-statement strings (the reference runs the statements one by one)
    S("multi_statement_sql",
      "CREATE TABLE x AS SELECT id, llm('S', title) AS a FROM movies; SELECT * FROM x",
      ref=("CREATE TABLE x AS SELECT id, llm('S', title) AS a FROM movies", "SELECT * FROM x")),
    S("multi_statement_execute",
      "CREATE TABLE x AS SELECT id, llm('S', title) AS a FROM movies; "
      "INSERT INTO x SELECT movie_id, llm('S', text) FROM reviews",
      api="execute", after="SELECT * FROM x",
      ref=("CREATE TABLE x AS SELECT id, llm('S', title) AS a FROM movies",
           "INSERT INTO x SELECT movie_id, llm('S', text) FROM reviews")),
]  # fmt: skip

OPTIMIZED_CORE = ["llm", "where_and_relational", "group_count_filter", "join_call_both"]
ONCE_SHAPES = ["llm", "where_two_filters", "group_by_choice", "join_call_both", "nested_ctes",
               "call_in_fields"]  # fmt: skip
PATHS: dict[str, str] = {}  # shape id -> "optimized" / "fallback: ..." / "error: ..."


# ---- running a shape -----------------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[tuple]
    after: list[tuple] | None
    fallback: str | None
    calls: list  # the oracle's OracleCalls of this run


def _run(shape: Shape, oracle, rewrite: bool) -> Outcome:
    con = llmudf.connect(config=Config(cache=False, progress=False, rewrite=rewrite))
    try:
        for statement in LOAD:
            con.execute(statement)
        start = len(oracle.calls)
        sql = shape.sql if rewrite or shape.ref is None else shape.ref
        statements = [sql] if isinstance(sql, str) else list(sql)
        fallback = None  # of the last statement with an LLM call
        for statement in statements[:-1]:
            con.execute(statement)
            fallback = con.last_fallback if "llm" in statement.lower() else fallback
        rows = _last(con, shape, statements[-1])
        fallback = con.last_fallback if "llm" in statements[-1].lower() else fallback
        after = con.sql(shape.after).fetchall() if shape.after else None
        return Outcome(rows, after, fallback, oracle.calls[start:])
    finally:
        con.close()


def _last(con, shape: Shape, sql: str) -> list[tuple]:
    if shape.api == "execute":
        return con.execute(sql, shape.params).fetchall()
    if shape.api == "dataframe":
        df = pd.DataFrame(_movie_rows(), columns=MOVIE_COLUMNS)  # noqa: F841 (found by name)
        return con.sql(sql).fetchall()
    return con.sql(sql, params=shape.params).fetchall()


def _normal(rows: list[tuple] | None, ordered: bool) -> list[tuple] | None:
    """Rows with floats rounded (sums may add in another order); sorted unless ordered."""
    if rows is None:
        return None

    def value(v):
        if isinstance(v, float) and not math.isnan(v):
            return round(v, 9)
        return v

    rows = [tuple(value(v) for v in row) for row in rows]
    return rows if ordered else sorted(rows, key=repr)


def _path(fallback: str | None) -> str:
    return "optimized" if fallback is None else f"fallback: {fallback}"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_rewrite_equals_per_chunk(shape, hash_oracle):
    try:
        got = _run(shape, hash_oracle, rewrite=True)
    except Exception as exc:
        PATHS[shape.id] = f"error: {_first_line(exc)}"
        raise
    PATHS[shape.id] = _path(got.fallback)
    ref = _run(shape, hash_oracle, rewrite=False)

    assert _normal(got.rows, shape.ordered) == _normal(ref.rows, shape.ordered)
    assert _normal(got.after, False) == _normal(ref.after, False)
    answers = {c.answer for c in ref.calls}
    if not shape.single:
        assert len(answers) >= 2, f"the oracle answered {answers}: the comparison is vacuous"
    # a bare column argument names its field (README: "the column name becomes the field name")
    unnamed = [c.user for c in got.calls + ref.calls if "\nfield1: " in c.user]
    assert not unnamed, f"fields named field1, ...: {unnamed[0]!r}"
    if shape.check is not None:
        shape.check(got.rows)


@pytest.mark.parametrize("shape_id", ONCE_SHAPES)
def test_rewrite_sends_each_distinct_prompt_once(shape_id, hash_oracle):
    shape = next(s for s in SHAPES if s.id == shape_id)
    got = _run(shape, hash_oracle, rewrite=True)
    assert got.fallback is None
    sent = Counter(c.prompt_key for c in got.calls)
    assert sent and max(sent.values()) == 1, sent.most_common(1)


def test_the_oracle_gives_every_kind_of_answer(hash_oracle):
    """Shapes marked `single` (no FROM, all-NULL fields) go through the same oracle, whose
    answers vary over the movies table."""
    con = llmudf.connect(config=Config(cache=False, progress=False))
    for statement in LOAD:
        con.execute(statement)
    sql = (
        f"SELECT llm_filter('Keep?', title), llm_score('Rate it', title), "
        f"llm_choice('Mood?', {MOOD}, title), llm('S', title) FROM movies"
    )
    columns = list(zip(*con.sql(sql).fetchall(), strict=True))
    con.close()
    assert set(columns[0]) == {True, False}
    assert len(set(columns[1])) >= 4 and set(columns[1]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(columns[2]) == {"happy", "sad", "tense"}
    assert len(set(columns[3])) == len(TITLES)


FALLS_BACK = {
    "call_over_aggregate", "grouped_nested_call",  # an argument is an aggregate
    "exists_correlated", "not_exists_correlated", "scalar_subquery_correlated",
    "correlated_outer_field", "lateral",  # read the outer query's columns
    "recursive_cte",
    "star_using_join",
    "pivot", "unpivot", "insert_values", "update_set", "update_where", "delete_where",
    "create_view",
}  # fmt: skip


def test_path_summary(hash_oracle):
    """Which path each shape took with the rewrite on; shapes not run yet (a -k selection) run
    here. Prints `shape -> optimized | fallback: reason | error: ...` (see it with -s)."""
    for shape in SHAPES:
        if shape.id not in PATHS:
            try:
                PATHS[shape.id] = _path(_run(shape, hash_oracle, rewrite=True).fallback)
            except Exception as exc:
                PATHS[shape.id] = f"error: {_first_line(exc)}"
    width = max(len(s.id) for s in SHAPES)
    print()
    for shape in SHAPES:
        print(f"{shape.id:<{width}}  {PATHS[shape.id]}")
    counts = Counter(p.split(":")[0] for p in PATHS.values())
    print(f"{len(SHAPES)} shapes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    assert len(SHAPES) >= 80
    assert all(PATHS[i] == "optimized" for i in OPTIMIZED_CORE), [
        (i, PATHS[i]) for i in OPTIMIZED_CORE
    ]
    # the README's table of what falls back: a shape that starts or stops falling back
    # must change it
    assert {i for i, p in PATHS.items() if p != "optimized"} == FALLS_BACK
