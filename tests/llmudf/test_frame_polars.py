"""The Polars namespace `df.llm` / `s.llm`: the same answers as pandas and SQL, as Polars
objects, with a real DuckDB and a real (tiny, random-init) engine."""

from __future__ import annotations

import os
import random

import pandas as pd
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError

if os.environ.get("CI"):  # the notebook extra is installed in CI: a missing Polars fails
    import polars as pl
else:
    pl = pytest.importorskip("polars")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}, "s": {"type": "string"}},
}


def _text(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnop ") for _ in range(48))


def _columns() -> dict[str, list]:
    rng = random.Random(0)
    titles = [_text(rng) for _ in range(6)]
    genres = [_text(rng) for _ in range(3)] + [None]
    return {
        "rid": list(range(14)),
        "title": [titles[i % 6] for i in range(14)],
        "genre": [genres[i % 4] for i in range(14)],
        "year": [1990 + i % 3 if i % 5 else None for i in range(14)],
    }


@pytest.fixture
def movies():
    return pl.DataFrame(_columns()).with_columns(pl.col("genre").cast(pl.Categorical))


@pytest.fixture
def pandas_movies() -> pd.DataFrame:
    return pd.DataFrame(_columns()).astype({"year": "Int64"})


def test_polars_gives_the_pandas_answers_as_polars_objects(make_config, movies, pandas_movies):
    config = make_config()
    fields = ["title", "genre", "year"]
    mapped = movies.llm.map("Summarize", fields, config=config)
    assert isinstance(mapped, pl.Series) and mapped.dtype == pl.String
    expected = pandas_movies.llm.map("Summarize", fields, config=config)
    assert pandas_movies.llm.last_stats.num_sent == 0  # the same prompts: all from the cache
    assert mapped.to_list() == expected.tolist() and mapped.n_unique() >= 2

    kept = movies.llm.filter("Keep?", ["title", "genre"], config=config)
    assert isinstance(kept, pl.DataFrame) and kept.schema == movies.schema
    expected = pandas_movies.llm.filter("Keep?", ["title", "genre"], config=config)
    assert kept["rid"].to_list() == expected["rid"].tolist() and 0 < len(kept) < 14

    picked = movies.llm.choice("Pick", ["red", "green", "blue"], {"t": "title"}, config=config)
    expected = pandas_movies.llm.choice(
        "Pick", ["red", "green", "blue"], {"t": "title"}, config=config
    )
    assert picked.dtype == pl.String and picked.to_list() == expected.tolist()

    scores = movies.llm.score("Rate it", ["title", "genre"], config=config, seed=3)
    expected = pandas_movies.llm.score("Rate it", ["title", "genre"], config=config, seed=3)
    assert scores.dtype == pl.Float64 and scores.to_list() == expected.tolist()
    assert scores.n_unique() >= 2


def test_polars_equals_sql_on_the_same_frame(make_config, movies):
    got = movies.llm.map("Summarize", ["title", "year"], config=make_config()).to_list()
    con = llmudf.connect(config=make_config(cache=False))
    df = movies  # noqa: F841 - read by the SQL below (DuckDB scans Polars frames)
    rows = con.sql("SELECT llm('Summarize', title, year) FROM df ORDER BY rid").fetchall()
    assert got == [a for (a,) in rows] and len(set(got)) >= 2


def test_polars_json_is_a_struct_typed_by_the_schema(make_config, movies, pandas_movies):
    config = make_config(max_tokens=24)
    objects = movies.llm.json("Describe", SCHEMA, ["title"], config=config)
    assert objects.dtype == pl.Struct({"n": pl.Int64, "ok": pl.Boolean, "s": pl.String})
    expected = pandas_movies.llm.json("Describe", SCHEMA, ["title"], config=config)
    assert objects.to_list() == expected.tolist()
    wide = movies.llm.json("Describe", SCHEMA, ["title"], expand=True, config=config)
    assert wide.schema == pl.Schema({"n": pl.Int64, "ok": pl.Boolean, "s": pl.String})
    assert wide.to_dicts() == objects.to_list()
    # a schema that leaves a type open (an enum of mixed types): an Object Series of dicts
    loose = {"type": "object", "properties": {"n": {"enum": [1, "two"]}}}
    free = movies.llm.json("Describe", loose, ["title"], config=config)
    assert free.dtype == pl.Object
    assert all(v["n"] in (1, "two") for v in free.to_list())


def test_polars_series_namespace_and_explain(make_config, movies):
    config = make_config()
    titles = movies["title"]
    assert titles.llm.map("Summarize", config=config).to_list() == (
        movies.llm.map("Summarize", ["title"], config=config).to_list()
    )
    assert titles.llm.last_stats.site == "s.llm.map"
    kept = titles.llm.filter("Keep?", config=config)
    assert isinstance(kept, pl.Series) and kept.name == "title"
    info = movies.llm.explain("map", "Summarize", ["title", "genre"], config=config)
    site = info.sites[0]
    assert (site.site, site.num_rows, site.num_requests, site.field_order) == (
        "df.llm.map",
        14,
        12,
        ("title", "genre"),
    )


def test_polars_errors_name_the_call(make_config, movies):
    config = make_config()
    with pytest.raises(LLMCallError, match=r"df\.llm\.map: unknown column 'Titel'"):
        movies.llm.map("Q", ["Titel"], config=config)
    with pytest.raises(LLMCallError, match=r"s\.llm\.score: the Series has no name.*alias"):
        pl.Series([1, 2]).llm.score("Q", config=config)
    with pytest.raises(LLMCallError, match=r"df\.llm\.choice: choices must be distinct"):
        movies.llm.choice("Q", ["a", "a"], config=config)
