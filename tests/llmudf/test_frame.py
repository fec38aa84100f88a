"""The pandas accessor `df.llm` / `s.llm` against SQL on the same frame, with a real DuckDB and
a real (tiny, random-init) engine."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import llmudf
from llmudf import frame as llm_frame
from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError
from llmudf.runtime.client import get_client

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}, "s": {"type": "string"}},
}


def _text(rng: random.Random) -> str:
    # long random values: the tiny random model's answers then vary from row to row
    return "".join(rng.choice("abcdefghijklmnop ") for _ in range(48))


@pytest.fixture
def movies() -> pd.DataFrame:
    """14 rows, 6 distinct titles; a categorical genre with NULLs; a nullable Int64 year."""
    rng = random.Random(0)
    titles = [_text(rng) for _ in range(6)]
    genres = [_text(rng) for _ in range(3)] + [None]
    return pd.DataFrame(
        {
            "rid": range(14),
            "title": [titles[i % 6] for i in range(14)],
            "genre": pd.Categorical([genres[i % 4] for i in range(14)]),
            "year": pd.array([1990 + i % 3 if i % 5 else None for i in range(14)], dtype="Int64"),
        }
    )


def _sql(make_config, sql: str, df: pd.DataFrame) -> list[tuple]:
    """`sql` over the frame `df` on an llmudf connection (no result cache: the model answers)."""
    con = llmudf.connect(config=make_config(cache=False))
    try:
        return con.sql(sql).fetchall()  # `df` resolves to the local frame (replacement scan)
    finally:
        con.close()


# (accessor call, the same call in SQL)
EQUIVALENT = {
    "map": (
        lambda df, c: df.llm.map("Summarize", ["title", "genre", "year"], config=c).tolist(),
        "SELECT llm('Summarize', title, genre, year) FROM df ORDER BY rid",
    ),
    "map, a mapping and options": (
        lambda df, c: df.llm.map(
            "Summarize", {"t": "title", "y": "year"}, config=c, max_tokens=3
        ).tolist(),
        "SELECT llm('Summarize', {'t': title, 'y': year}, {'max_tokens': 3}) FROM df ORDER BY rid",
    ),
    "filter": (
        lambda df, c: df.llm.filter("Keep?", ["title", "genre"], config=c)["rid"].tolist(),
        "SELECT rid FROM df WHERE llm_filter('Keep?', title, genre) ORDER BY rid",
    ),
    "choice": (
        lambda df, c: df.llm.choice("Pick", ["red", "green", "blue"], ["title"], config=c).tolist(),
        "SELECT llm_choice('Pick', ['red', 'green', 'blue'], title) FROM df ORDER BY rid",
    ),
    "score": (
        lambda df, c: df.llm.score("Rate it", ["title", "genre"], config=c).tolist(),
        "SELECT llm_score('Rate it', title, genre) FROM df ORDER BY rid",
    ),
    "json": (
        lambda df, c: df.llm.json("Describe", SCHEMA, ["title"], config=c, max_tokens=24).tolist(),
        f"SELECT llm_json('Describe', '{json.dumps(SCHEMA)}', title, {{'max_tokens': 24}}) "
        "FROM df ORDER BY rid",
    ),
}


@pytest.mark.parametrize("name", EQUIVALENT)
def test_accessor_gives_the_sql_answers(make_config, movies, name):
    call, sql = EQUIVALENT[name]
    got = call(movies, make_config())
    # SQL reads the categorical as strings: an ENUM column fails in optimizer/encode.py
    # (`fill_null(-1)` on its unsigned dictionary indices)
    expected = [row[0] for row in _sql(make_config, sql, movies.astype({"genre": object}))]
    if name == "json":
        expected = [json.loads(v) for v in expected]
        assert all(set(v) == {"n", "ok", "s"} for v in got)
    if name == "filter":
        assert 0 < len(got) < len(movies)  # the guard: the answers vary
    else:
        assert len(got) == len(movies) and len({repr(v) for v in got}) >= 2  # they vary
    assert got == expected


def test_every_column_by_default_rendered_as_in_sql(make_config, movies):
    """fields=None: every column, in order; nullable ints, NaN floats, categoricals, booleans,
    dates and timestamps reach the prompt as SQL renders them."""
    frame = pd.DataFrame(
        {
            "title": movies["title"],
            "n": movies["year"],
            "x": [np.nan if i % 4 == 0 else i / 2 for i in range(14)],
            "flag": pd.array([None if i % 3 == 0 else i % 2 == 0 for i in range(14)], "boolean"),
            "day": [dt.date(2020, 1, 1 + i % 3) for i in range(14)],
            "ts": pd.to_datetime([f"2021-05-0{1 + i % 2} 10:30" for i in range(14)]),
        }
    )
    got = frame.llm.map("Describe", config=make_config()).tolist()
    df = frame.assign(rid=range(14))  # noqa: F841 - read by the SQL below
    sql = "SELECT llm('Describe', title, n, x, flag, day, ts) FROM df ORDER BY rid"
    assert got == [row[0] for row in _sql(make_config, sql, df)]
    assert len(set(got)) >= 2


def test_each_distinct_prompt_is_answered_once_then_cached(make_config, movies):
    config = make_config()
    first = movies.llm.map("Summarize", ["title"], config=config)
    stats = movies.llm.last_stats
    assert (stats.site, stats.num_rows, stats.num_requests, stats.num_sent) == (
        "df.llm.map",
        14,
        6,  # 6 distinct titles
        6,
    )
    again = movies.llm.map("Summarize", ["title"], config=config)
    stats = movies.llm.last_stats
    assert (stats.num_cache_hits, stats.num_sent) == (6, 0)
    assert again.tolist() == first.tolist()


@pytest.mark.parametrize(
    "same",
    [
        pd.Series([1.0, 2.0, np.nan]),  # numpy float: an int column with NaN
        pd.Series([1, 2, None], dtype="Int32"),
        pd.Series(pd.Categorical([1, 2, None])),
        pd.Series([1, 2, pd.NA], dtype=object),
        pd.Series([1, 2, None], dtype="int64[pyarrow]"),
    ],
    ids=["float-nan", "Int32", "categorical", "object", "arrow"],
)
def test_a_value_renders_the_same_whatever_its_dtype(make_config, same):
    config = make_config()
    expected = pd.DataFrame({"n": pd.array([1, 2, None], "Int64")}).llm.map("Q", config=config)
    frame = pd.DataFrame({"n": same})
    got = frame.llm.map("Q", config=config)
    stats = frame.llm.last_stats
    assert (stats.num_requests, stats.num_cache_hits, stats.num_sent) == (3, 3, 0)
    assert got.tolist() == expected.tolist()


def test_strings_render_the_same_whatever_their_dtype(make_config, movies):
    config = make_config()
    titles = movies["title"].tolist()
    expected = pd.DataFrame({"t": titles}).llm.map("Q", config=config).tolist()
    for column in (pd.Categorical(titles), pd.Series(titles, dtype=object)):
        frame = pd.DataFrame({"t": column})
        assert frame.llm.map("Q", config=config).tolist() == expected
        assert frame.llm.last_stats.num_sent == 0


@pytest.mark.parametrize(
    "index",
    [
        pd.Index(["a", "b"] * 7),  # duplicated labels
        pd.MultiIndex.from_arrays([[i % 3 for i in range(14)], list("abcdefghijklmn")]),
        pd.Index(range(140, 0, -10)),
        pd.CategoricalIndex(["x", "y"] * 7),
    ],
    ids=["duplicates", "multi", "descending", "categorical"],
)
def test_answers_keep_the_frames_order_and_index(make_config, movies, index):
    config = make_config()
    plain = movies.llm.map("Summarize", ["title", "genre"], config=config)
    kept = movies.llm.filter("Keep?", ["title", "genre"], config=config)
    framed = movies.set_axis(index)
    got = framed.llm.map("Summarize", ["title", "genre"], config=config)
    assert got.index.equals(index) and got.tolist() == plain.tolist()
    filtered = framed.llm.filter("Keep?", ["title", "genre"], config=config)
    positions = kept.index.to_numpy()  # movies has a RangeIndex: labels are positions
    assert filtered.equals(framed.iloc[positions])
    assert filtered.dtypes.equals(framed.dtypes)


def test_a_null_field_is_left_out_and_an_all_null_row_runs(make_config, movies):
    config = make_config()
    titles, genres = movies["title"].tolist()[:3], movies["genre"].tolist()[:3]
    frame = pd.DataFrame(
        {
            "title": titles + [None],
            "genre": pd.Series([genres[0], None, np.nan, pd.NA], dtype=object),
        }
    )
    both = frame.llm.map("Summarize", config=config)
    title_only = frame[["title"]].llm.map("Summarize", config=config)
    assert both[1:3].tolist() == title_only[1:3].tolist()  # NULL genre: the title line only
    assert both[0] != title_only[0]  # (the genre line matters when it is there)
    instruction_only = frame.llm.map("Summarize", [], config=config)
    assert instruction_only.nunique() == 1  # no fields: every row is the same prompt
    assert isinstance(both[3], str) and both[3] == instruction_only[3]


def test_results_are_typed_like_the_sql_functions(make_config, movies):
    config = make_config()
    mapped = movies.llm.map("Summarize", ["title"], config=config)
    assert mapped.name == "llm" and mapped.dtype == pd.Series(["text"]).dtype
    choices = movies.llm.choice("Pick", ["red", "green"], ["title"], config=config)
    assert set(choices) <= {"red", "green"} and choices.name == "llm_choice"
    scores = movies.llm.score("Rate it", ["title"], config=config)
    assert scores.dtype == np.float64 and scores.between(1, 5).all()
    kept = movies.llm.filter("Keep?", ["title"], config=config)
    assert list(kept.columns) == list(movies.columns) and kept.dtypes.equals(movies.dtypes)

    objects = movies.llm.json("Describe", SCHEMA, ["title"], config=config, max_tokens=24)
    assert objects.dtype == object and all(isinstance(v, dict) for v in objects)
    wide = movies.llm.json("Describe", SCHEMA, ["title"], expand=True, config=config, max_tokens=24)
    assert list(wide.columns) == ["n", "ok", "s"] and wide.index.equals(movies.index)
    assert [str(wide[c].dtype) for c in ("n", "ok")] == ["Int64", "boolean"]
    assert wide["s"].dtype == pd.Series(["text"]).dtype
    assert wide.to_dict("records") == objects.tolist()


def test_an_empty_frame_gives_empty_results(make_config, movies):
    empty = movies.iloc[:0]
    assert empty.llm.map("Summarize", ["title"], config=make_config()).empty
    assert empty.llm.filter("Keep?", config=make_config()).columns.equals(movies.columns)
    assert empty.llm.last_stats.num_rows == 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda df, c: df.llm.map("Q", ["Titel"], config=c),
            LLMCallError,
            r"df\.llm\.map: unknown column 'Titel'; columns: \['rid', 'title'",
        ),
        (
            lambda df, c: df.llm.choice("Q", "red", ["title"], config=c),
            LLMCallError,
            r"df\.llm\.choice: choices must be a non-empty list of strings",
        ),
        (
            lambda df, c: df.llm.map("Q", ["title"], config=c, max_token=4),
            LLMCallError,
            r"df\.llm\.map: unknown option\(s\) \['max_token'\].*did you mean 'max_tokens'",
        ),
        (
            lambda df, c: df.llm.score("Q", config=c, temperature=-1),
            LLMCallError,
            r"df\.llm\.score: bad option: temperature must be",
        ),
        (
            lambda df, c: df.llm.json("Q", {"type": "array"}, expand=True, config=c),
            LLMCallError,
            r"df\.llm\.json: expand=True needs a schema of an object with properties",
        ),
        (
            lambda df, c: df.llm.json("Q", "{not json", config=c),
            LLMCallError,
            r"df\.llm\.json: json_schema is not valid JSON",
        ),
        (
            lambda df, c: df.llm.filter(["Q"], config=c),
            LLMCallError,
            r"df\.llm\.filter: the instruction must be a str",
        ),
        (
            lambda df, c: df.llm.map("Q", {"t": "title", "": "year"}, config=c),
            LLMCallError,
            r"df\.llm\.map: a field name must be a non-empty str",
        ),
        (
            lambda df, c: df.llm.map("Q", ["title", "title"], config=c),
            LLMCallError,
            r"df\.llm\.map: field name\(s\) \['title'\] given more than once",
        ),
        (
            lambda df, c: df.rename(columns={"rid": "title"}).llm.map("Q", ["title"], config=c),
            LLMCallError,
            r"df\.llm\.map: column 'title' appears 2 times",
        ),
        (
            lambda df, c: df["title"].rename(None).llm.map("Q", config=c),
            LLMCallError,
            r"s\.llm\.map: the Series has no name.*s\.rename\('title'\)",
        ),
        (
            lambda df, c: df.llm.explain("summarize", "Q", config=c),
            LLMCallError,
            r"df\.llm\.summarize: unknown operator 'summarize'",
        ),
        (
            lambda df, c: df.llm.explain("choice", "Q", config=c),
            TypeError,
            r"df\.llm\.choice: missing a required argument: 'choices'",
        ),
        (
            lambda df, c: df.llm.map("Q", config=c.model),
            TypeError,
            r"df\.llm\.map: config must be a llmudf\.Config",
        ),
    ],
)
def test_errors_name_the_call(make_config, movies, call, error, match):
    with pytest.raises(error, match=match):
        call(movies, make_config())


def test_series_accessor_is_the_one_column_case(make_config, movies):
    config = make_config()
    titles = movies["title"]
    assert titles.llm.map("Summarize", config=config).tolist() == (
        movies.llm.map("Summarize", ["title"], config=config).tolist()
    )
    assert titles.llm.last_stats.site == "s.llm.map"
    kept = titles.llm.filter("Keep?", config=config)
    assert kept.equals(movies.llm.filter("Keep?", ["title"], config=config)["title"])
    scores = movies["year"].llm.score("Rate it", config=config)
    assert scores.index.equals(movies.index) and scores.dtype == np.float64
    picked = titles.llm.choice("Pick", ["red", "green"], config=config)
    assert set(picked) <= {"red", "green"}


def test_explain_matches_sql_and_loads_no_model(make_config, movies):
    # an engine setting no other test uses: a client of its own, whose engine is never built
    config = make_config(engine={"device": "cpu", "kv_cache_bytes": 48 << 20})
    info = movies.llm.explain("filter", "Keep?", ["title", "genre"], config=config)
    assert get_client(config)._engine is None
    assert movies.llm.last_stats is None  # explain runs nothing
    [site] = info.sites
    assert (site.site, site.num_rows, site.num_requests, site.unit) == (
        "df.llm.filter",
        14,
        12,  # 6 titles x 4 genres, 12 distinct pairs in 14 rows
        "tokens",
    )
    assert site.field_order == ("title", "genre")
    con = llmudf.connect(config=config)
    df = movies.astype({"genre": object})  # noqa: F841 - read by the SQL below (no ENUM)
    [sql_site] = con.explain_llm("SELECT rid FROM df WHERE llm_filter('Keep?', title, genre)").sites
    for name in ("num_rows", "num_requests", "prompt_units", "cached_units", "field_order"):
        assert getattr(site, name) == getattr(sql_site, name)
    choice = movies["title"].llm.explain("choice", "Pick", ["red", "green"], config=config)
    assert (choice.sites[0].site, choice.sites[0].num_requests) == ("s.llm.choice", 6)


def test_last_stats_belong_to_each_frame(make_config, movies):
    config = make_config()
    other = movies.iloc[:4]
    assert movies.llm is not movies.llm  # pandas builds a new accessor on every access
    assert movies.llm.last_stats is None
    movies.llm.map("Summarize", ["title"], config=config)
    other.llm.score("Rate it", ["title"], config=config)
    assert movies.llm.last_stats.site == "df.llm.map"
    assert llm_frame.last_stats(movies) is movies.llm.last_stats
    assert (other.llm.last_stats.site, other.llm.last_stats.num_rows) == ("df.llm.score", 4)


def test_set_config_is_the_default_of_every_call(make_config, movies):
    config = make_config()
    expected = movies.llm.map("Summarize", ["title"], config=config).tolist()
    before = llm_frame.get_config()
    try:
        llm_frame.set_config(config)
        assert movies.llm.map("Summarize", ["title"]).tolist() == expected
        assert movies.llm.last_stats.num_sent == 0  # the same result cache
        llm_frame.set_config(**{"model": config.model, "engine": config.engine, "cache": False})
        assert llm_frame.get_config().cache is False
        with pytest.raises(TypeError, match="either a Config or keyword options"):
            llm_frame.set_config(config, max_tokens=4)
        with pytest.raises(TypeError, match="unknown llmudf option"):
            llm_frame.set_config(max_token=4)
    finally:
        llm_frame.set_config(before)


def test_import_llmudf_registers_the_accessors():
    from llmudf.frame_accessors import DataFrameLLM, SeriesLLM

    assert pd.DataFrame.llm is DataFrameLLM and pd.Series.llm is SeriesLLM


def test_import_llmudf_registers_pandas_without_polars_torch_or_duckdb():
    code = (
        "import sys; sys.modules['polars'] = None  # as if Polars were not installed\n"
        "import llmudf, pandas\n"
        "assert pandas.DataFrame.llm.__name__ == 'DataFrameLLM'\n"
        "print(sorted(m for m in ('torch', 'duckdb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_default_model_accessor_equals_sql(tmp_path):
    """The real default model on 10 movies: the accessor and llmudf.connect().sql() agree."""
    df = llmudf.datasets.read_movies(10)["omdb"].to_pandas()[["ID", "Title", "Genre", "Year"]]
    config = Config(progress=False, cache_dir=str(tmp_path / "frame"))
    moods = df.llm.map(
        "One-word mood of this movie?", ["Title", "Genre"], config=config, max_tokens=6
    )
    kids = df.llm.filter(
        "Is this movie suitable for young children?", ["Title", "Genre"], config=config
    )
    con = llmudf.connect(config=Config(progress=False, cache_dir=str(tmp_path / "sql")))
    sql_moods = con.sql(
        "SELECT llm('One-word mood of this movie?', Title, Genre, {'max_tokens': 6}) "
        "FROM df ORDER BY ID"
    ).fetchall()
    sql_kids = con.sql(
        "SELECT ID FROM df WHERE llm_filter('Is this movie suitable for young children?', "
        "Title, Genre) ORDER BY ID"
    ).fetchall()
    assert moods.tolist() == [m for (m,) in sql_moods] and moods.nunique() >= 2
    assert kids["ID"].tolist() == [i for (i,) in sql_kids]
    assert df.llm.last_stats.num_rows == 10
