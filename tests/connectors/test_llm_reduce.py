"""llm_reduce: the rows of each group in one prompt, in content order (so the answer does not
depend on input order, threads or plan), hierarchical past the context, in DuckDB through
`connect()` and through plain `register()`; clear errors where it is not an aggregate."""

from __future__ import annotations

import random
import re

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

import llmudf
from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError
from llmudf.calls.reduce import bind_reduce
from llmudf.runtime.reduce import run_reduce

GENRES = ["Drama", "Comedy", "Horror"]
QUERY = (
    "SELECT genre, llm_reduce('What do these movies share?', title, year) AS s "
    "FROM movies GROUP BY genre ORDER BY genre"
)


def movies(num_rows: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = [
        (GENRES[i % 3], f"movie number {i} about {rng.choice(['a dog', 'a ship', 'a town'])}")
        for i in range(num_rows)
    ]
    frame = pd.DataFrame(rows, columns=["genre", "title"])
    frame["year"] = [1950 + (i * 7) % 70 for i in range(num_rows)]
    frame.loc[4, "year"] = None  # a NULL field is left out of its row
    return frame


def load(con, frame: pd.DataFrame) -> None:
    con.register("movies_frame", frame)
    con.execute("CREATE TABLE movies AS SELECT * FROM movies_frame")


def oracle_config(**kw) -> Config:
    return Config(cache=False, progress=False, **kw)


def direct(frame: pd.DataFrame, client, names=("title", "year"), **kw) -> dict:
    """Each genre reduced by `run_reduce` on its rows, as a reference."""
    genres = sorted(frame["genre"].unique())
    groups = []
    for g in genres:
        rows = frame[frame["genre"] == g][["title", "year"]]
        groups.append(pa.table(dict(zip(names, (rows["title"], rows["year"]), strict=True))))
    spec = bind_reduce(site="reference")
    result = run_reduce(spec, "What do these movies share?", groups, oracle_config(), client, **kw)
    return dict(zip(genres, result.answers, strict=True))


def test_answer_does_not_depend_on_row_order(hash_oracle):
    group = pa.table({"title": [f"title {i}" for i in range(12)], "n": list(range(12))})
    spec = bind_reduce(site="t")
    first = run_reduce(spec, "Q", [group], oracle_config(), hash_oracle, context=4096)
    order = list(range(12))
    random.Random(1).shuffle(order)
    shuffled = run_reduce(
        spec, "Q", [group.take(order)], oracle_config(), hash_oracle, context=4096
    )
    assert first.answers == shuffled.answers and first.answers[0].startswith("ans-")
    assert first.num_levels == 1 and hash_oracle.num_batches == 2
    prompt = hash_oracle.calls[0].user
    positions = [prompt.index(f"title: title {i}\n") for i in sorted(range(12), key=str)]
    assert positions == sorted(positions)  # rows sorted by their text


def test_group_past_the_context_is_reduced_hierarchically(hash_oracle):
    titles = [f"a film about the number {i:03d} and its friends" for i in range(120)]
    group = pa.table({"title": titles})
    spec = bind_reduce(site="t")
    result = run_reduce(spec, "Q", [group], oracle_config(), hash_oracle, context=700)
    assert result.num_levels >= 3 and hash_oracle.num_batches == result.num_levels
    leaves = [c.user for c in hash_oracle.calls if "Rows:" in c.user]
    assert len(leaves) > 5
    listed = [line for p in leaves for line in p.split("\n") if line.startswith("title: ")]
    assert sorted(listed) == sorted(f"title: {t}" for t in titles)  # each row once
    system = len(llmudf.calls.prompt.SYSTEM_PROMPT.encode())
    # no tokenizer (the oracle): prompts are counted in bytes, within the context
    assert max(len(c.user.encode()) + system for c in hash_oracle.calls) <= 700 - 32
    assert result.answers == [hash_oracle.calls[-1].answer]  # the last combine is the answer
    reversed_group = group.take(list(range(119, -1, -1)))
    again = run_reduce(spec, "Q", [reversed_group], oracle_config(), hash_oracle, context=700)
    assert again.answers == result.answers


def test_a_row_longer_than_the_context_is_an_error(hash_oracle):
    group = pa.table({"plot": ["x" * 2000, "short"]})
    with pytest.raises(LLMCallError, match=r"t: a row of a group does not fit .* 400 tokens"):
        run_reduce(bind_reduce(site="t"), "Q", [group], oracle_config(), hash_oracle, context=400)


def test_duckdb_group_by_answers_each_group(hash_oracle):
    con = llmudf.connect(config=oracle_config())
    frame = movies()
    load(con, frame)
    got = dict(con.sql(QUERY).fetchall())
    assert got == direct(frame, hash_oracle)
    assert len(set(got.values())) == 3
    assert hash_oracle.num_batches == 2  # all groups in one batch (and one for the reference)
    (stats,) = con.last_stats
    assert (stats.num_rows, stats.num_requests) == (30, 3)


def test_duckdb_answers_do_not_depend_on_order_or_threads(hash_oracle):
    frame = movies()
    shuffled = frame.sample(frac=1.0, random_state=3)
    answers = []
    for data, threads in ((frame, 1), (shuffled, 4)):
        con = llmudf.connect(config=oracle_config())
        con.execute(f"SET threads = {threads}")
        load(con, data)
        answers.append(con.sql(QUERY).fetchall())
    assert answers[0] == answers[1]


def test_plain_register_names_bare_fields_by_position(hash_oracle):
    frame = movies()
    con = duckdb.connect()
    llmudf.register(con, config=oracle_config())
    load(con, frame)
    got = dict(con.sql(QUERY).fetchall())
    assert got == direct(frame, hash_oracle, names=("field1", "field2"))
    named = (
        "SELECT genre, llm_reduce('What do these movies share?', {'title': title, 'year': year})"
    )
    got = dict(con.sql(f"{named} FROM movies GROUP BY genre").fetchall())
    assert got == direct(frame, hash_oracle)


def test_reduce_with_options_next_to_a_row_call_and_whole_table(hash_oracle):
    con = llmudf.connect(config=oracle_config())
    load(con, movies())
    rows = con.sql(
        "SELECT genre, llm('Name one.', genre) AS n, "
        "llm_reduce('Sum up.', title, {'max_tokens': 2}) AS s FROM movies GROUP BY genre"
    ).fetchall()
    assert len(rows) == 3 and all(len(s) == 4 for _g, _n, s in rows)  # 2-token oracle answers
    assert con.last_fallback is None or "aggregate" in con.last_fallback
    (whole,) = con.sql("SELECT llm_reduce('Sum up.', title) FROM movies").fetchall()
    assert whole[0].startswith("ans-")
    empty = con.sql("SELECT llm_reduce('Sum up.', title) FROM movies WHERE year > 3000")
    assert empty.fetchall() == [(None,)]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT title FROM movies WHERE llm_reduce('Q', title) = 'x'", "cannot be in WHERE"),
        ("SELECT llm_reduce('Q', title) OVER () FROM movies", "not a window function"),
        ("SELECT genre, llm_reduce('Q', title) FROM movies", "no GROUP BY .* selects genre"),
        ("SELECT llm_reduce('Q') FROM movies", "expected llm_reduce"),
    ],
)
def test_reduce_outside_an_aggregate_is_a_clear_error(hash_oracle, sql, message):
    con = llmudf.connect(config=oracle_config())
    load(con, movies())
    with pytest.raises(LLMCallError, match=f"llm_reduce #1: .*{message}"):
        con.sql(sql)
    assert hash_oracle.calls == []


def test_hierarchical_reduce_on_a_tiny_model(make_config):
    engine = {"device": "cpu", "kv_cache_bytes": 64 << 20, "max_model_len": 512}
    config = make_config(engine=engine, max_tokens=8)
    frame = movies(num_rows=45)
    answers = []
    for data in (frame, frame.iloc[::-1]):
        con = llmudf.connect(config=config)
        load(con, data)
        answers.append(con.sql(QUERY).fetchall())
        (stats,) = con.last_stats
    assert answers[0] == answers[1]
    assert [g for g, _s in answers[0]] == sorted(GENRES)
    assert all(isinstance(s, str) for _g, s in answers[0])
    # 15 rows of ~60 bytes (a token each) per group pass 512 tokens: parts, then combines
    assert stats.num_requests > 3 * 3


def test_pandas_accessor_gives_duckdbs_answers(hash_oracle):
    frame = movies()
    con = llmudf.connect(config=oracle_config())
    load(con, frame)
    duck = dict(con.sql(QUERY).fetchall())
    instruction = "What do these movies share?"
    shuffled = frame.sample(frac=1.0, random_state=5)
    got = shuffled.llm.reduce(instruction, ["title", "year"], by="genre", config=oracle_config())
    assert got.to_dict() == duck and list(got.index) == sorted(GENRES)
    whole = frame.llm.reduce(instruction, ["title"], config=oracle_config())
    ((expected,),) = con.sql(f"SELECT llm_reduce('{instruction}', title) FROM movies").fetchall()
    assert whole == expected


def test_explain_plans_the_hierarchy_without_the_model(hash_oracle):
    con = llmudf.connect(config=oracle_config(engine={"max_model_len": 700}))
    load(con, movies(num_rows=120))
    info = con.explain_llm(QUERY)
    assert hash_oracle.calls == []
    (site,) = info.sites
    assert (site.site, site.num_rows, site.unit) == ("llm_reduce", 120, "bytes")
    match = re.search(r"3 groups, 120 rows -> ([\d +]+) prompts in (\d) level", site.hierarchy)
    per_level = [int(n) for n in match.group(1).split(" + ")]
    assert len(per_level) == int(match.group(2)) >= 2 and "llm_reduce: 3 groups" in str(info)
    con.sql(QUERY).fetchall()
    leaves = [c for c in hash_oracle.calls if "Rows:" in c.user]
    assert len(leaves) == per_level[0]  # the first level exactly; the combines are estimated
    assert len(hash_oracle.calls) == site.num_requests == sum(per_level)


def test_polars_accessor_gives_duckdbs_answers(hash_oracle):
    pl = pytest.importorskip("polars")
    frame = movies()
    con = llmudf.connect(config=oracle_config())
    load(con, frame)
    duck = sorted(con.sql(QUERY).fetchall())
    got = pl.from_pandas(frame).llm.reduce(
        "What do these movies share?", ["title", "year"], by="genre", config=oracle_config()
    )
    assert sorted(got.iter_rows()) == duck


def test_create_table_as_answers_its_groups_in_one_batch(hash_oracle):
    frame = movies()
    con = llmudf.connect(config=oracle_config())
    load(con, frame)
    con.execute(f"CREATE TABLE summaries AS {QUERY}")
    assert hash_oracle.num_batches == 1
    assert dict(con.sql("SELECT * FROM summaries").fetchall()) == direct(frame, hash_oracle)
