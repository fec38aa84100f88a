import datetime
import doctest
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import llmudf
from llmudf import datasets

README = Path(__file__).resolve().parents[2] / "README.md"
OMDB_COLUMNS = [
    "ID", "imdbID", "Title", "Year", "Rating", "Runtime", "Genre", "Released", "Director",
    "Writer", "Cast", "Metacritic", "imdbRating", "imdbVotes", "Language", "Country", "Awards",
    "lastUpdated", "Oscars",
]  # fmt: skip
TOMATOES_COLUMNS = [
    "ID", "Image", "Rating", "Meter", "Reviews", "Fresh", "Rotten", "Consensus", "userMeter",
    "userRating", "userReviews", "DVD", "BoxOffice", "Production", "Website", "lastUpdated",
]  # fmt: skip


def test_read_movies_reads_every_movie_with_typed_columns():
    tables = datasets.read_movies()
    omdb, tomatoes = tables["omdb"], tables["tomatoes"]
    assert (omdb.num_rows, tomatoes.num_rows) == (17472, 17472)
    assert omdb.column_names == OMDB_COLUMNS and tomatoes.column_names == TOMATOES_COLUMNS
    assert omdb.column("ID").to_pylist() == tomatoes.column("ID").to_pylist()
    types = {f.name: str(f.type) for f in omdb.schema}
    assert (types["Year"], types["Runtime"], types["Released"]) == ("int64", "int64", "date32[day]")
    assert (types["Rating"], types["imdbVotes"]) == ("string", "int64")  # typed though all NULL
    assert str(tomatoes.schema.field("Rating").type) == "double"
    first = omdb.slice(0, 1).to_pylist()[0]
    assert first["Title"] == "We Live in Public" and first["Year"] == 2009
    assert first["Released"] == datetime.date(2009, 1, 19) and first["Runtime"] == 90
    assert tomatoes.slice(0, 1).to_pylist()[0]["Meter"] == 82


def test_read_movies_first_rows_and_rated_only():
    rated = datasets.read_movies(3, rated_only=True)
    omdb = rated["omdb"]
    assert omdb.column("Title").to_pylist() == ["The Intouchables", "Kick-Ass", "Alien Raiders"]
    assert omdb.column("Rating").to_pylist() == ["R", "R", "R"]
    assert rated["tomatoes"].column("ID").to_pylist() == omdb.column("ID").to_pylist()
    assert datasets.read_movies(0)["omdb"].num_rows == 0
    with pytest.raises(ValueError, match="num_rows must be >= 0"):
        datasets.read_movies(-1)


def test_movies_loads_a_plain_duckdb_connection_and_replaces_its_tables():
    con = duckdb.connect()
    datasets.movies(con, num_rows=10)
    datasets.movies(con, num_rows=4)  # again: replaced, not appended, no views left behind
    assert con.sql("SHOW TABLES").fetchall() == [("omdb",), ("tomatoes",)]
    assert con.sql("SELECT COUNT(*) FROM omdb JOIN tomatoes USING (ID)").fetchall() == [(4,)]
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE omdb)").fetchall())
    assert (types["Year"], types["Released"], types["Title"]) == ("BIGINT", "DATE", "VARCHAR")


def test_movies_loads_an_llmudf_connection(tiny_model_path):
    with llmudf.connect(model=tiny_model_path) as con:
        llmudf.datasets.movies(con, num_rows=5, rated_only=True)
        query = "SELECT o.Title, t.Meter FROM omdb o JOIN tomatoes t USING (ID) ORDER BY ID"
        rows = con.sql(query).fetchall()
    assert len(rows) == 5 and rows[:2] == [("The Intouchables", 76), ("Kick-Ass", 77)]


def test_missing_sample_data_names_the_install_command(monkeypatch):
    monkeypatch.setattr("llmudf.runtime.paths.package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps bokeh-sampledata"):
        datasets.read_movies(1)


def test_found_without_importing_bokeh_sampledata():
    code = (
        "import sys, llmudf; llmudf.datasets.read_movies(1); "
        "print('bokeh_sampledata' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"


def test_docstring_examples_hold():
    assert doctest.testmod(datasets).failed == 0


def readme_python_example() -> str:
    section = README.read_text().split("## Use it from DuckDB (Python)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(capsys):
    namespace: dict = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)
    with namespace["con"] as con:
        query = "SELECT Title FROM omdb WHERE Year = 2014 AND Genre LIKE '%Animation%'"
        candidates = {title for (title,) in con.sql(query).fetchall()}
    kids = namespace["kids"]
    assert list(kids.columns) == ["Title", "Rating"] and len(candidates) == 25
    assert 0 < len(kids) <= 25 and set(kids["Title"]) <= candidates
    out = capsys.readouterr().out
    # last_stats: the model saw the 25 rows the WHERE kept; explain_llm: the full query's cost
    assert "site='llm_filter #1 in WHERE', num_rows=25, num_requests=25" in out
    assert "rows 9139 -> 9128 prompts after dedup" in out
    assert "below the LLM: filter Year > 2000" in out
