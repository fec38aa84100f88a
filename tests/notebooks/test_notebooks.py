"""The notebooks of notebooks/: the stored copies are executed ones (fast), and each runs top
to bottom on the default model with the outputs its text promises (slow).

The slow tests run a copy in a tmp dir with `execute` of notebooks/run_all.py (the script
that stores them): a python3 kernel of this interpreter, an empty result cache. The stored
notebooks are never written.
"""

import html
import importlib.util
import re
import shutil
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_pandas_analysis.ipynb", "03_what_the_optimizer_buys.ipynb"]
NUM_FIGURES = {"02_pandas_analysis.ipynb": 2, "03_what_the_optimizer_buys.ipynb": 2}


def code_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def cell_with(notebook, marker: str):
    """The one code cell whose source contains `marker`."""
    cells = [c for c in code_cells(notebook) if marker in c.source]
    assert len(cells) == 1, f"{len(cells)} code cells contain {marker!r}"
    return cells[0]


def text_of(cell) -> str:
    """The cell's printed text and the plain text of its results."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def html_of(cell) -> str:
    found = [out.data["text/html"] for out in cell.outputs if "text/html" in out.get("data", {})]
    assert found, "no text/html output"
    return found[-1]


def table_rows(table_html: str) -> list[list[str]]:
    """The body rows of the first HTML table (a DataFrame's, a Styler's or llmudf's), each as
    the text of its cells, index included."""
    body = re.search(r"<tbody>(.*?)</tbody>", table_html, re.S)
    assert body, "no <tbody> in the HTML output"
    rows = re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    cell = re.compile(r"<t[hd][^>]*>(.*?)</t[hd]>", re.S)
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", text)).strip() for text in cell.findall(row)]
        for row in rows
    ]


def num_figures(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def errors(notebook) -> list[str]:
    return [
        f"{out.ename}: {out.evalue}"
        for cell in code_cells(notebook)
        for out in cell.outputs
        if out.output_type == "error"
    ]


# ---- the stored notebooks ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_was_executed_top_to_bottom(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert errors(notebook) == []
    assert sum(num_figures(c) for c in cells) >= NUM_FIGURES.get(name, 0)


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


# ---- executed here -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_notebook(tmp_path_factory):
    """`run_notebook(name) -> NotebookNode`: a copy of notebooks/<name>, run top to bottom
    by notebooks/run_all.py's `execute`, with no error cell."""
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOKS / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)

    def run(name: str):
        folder = tmp_path_factory.mktemp(Path(name).stem)
        shutil.copy(NOTEBOOKS / name, folder / name)
        notebook = run_all.execute(folder / name, str(tmp_path_factory.mktemp("work")))
        assert errors(notebook) == []
        return notebook

    return run


@pytest.mark.slow
def test_quickstart(run_notebook):
    notebook = run_notebook("01_quickstart.ipynb")
    # the filter sees the 25 animated movies of 2014 and keeps some
    kids = table_rows(html_of(cell_with(notebook, "kids = con.sql(")))
    assert 1 <= len(kids) <= 25
    stats = table_rows(html_of(cell_with(notebook, "con.last_stats")))
    assert [row[:2] for row in stats] == [["llm_filter #1 in WHERE", "25"]]
    moods = table_rows(html_of(cell_with(notebook, "moods = con.sql(")))
    assert len(moods) == 20
    assert {row[-1] for row in moods} <= {"funny", "dark", "exciting", "romantic", "sad"}
    scores = table_rows(html_of(cell_with(notebook, "AVG(llm_score(")))
    assert [row[1] for row in scores] == ["G", "PG", "PG-13", "R"]
    assert all(1.0 <= float(row[-1]) <= 5.0 for row in scores)
    assert "llm_filter #1 in WHERE" in html_of(cell_with(notebook, "con.explain_llm("))
    # the result cache: the second run sends nothing and answers the same
    first = text_of(cell_with(notebook, "first = fresh.sql("))
    assert int(re.search(r"(\d+) prompts sent", first).group(1)) > 0
    second = text_of(cell_with(notebook, "second = fresh.sql("))
    assert "0 prompts sent to the model, same answers: True" in second
    # %%llm_sql: the plan, then the answers, also stored in `audience`
    assert "llm_choice #1 in SELECT" in html_of(cell_with(notebook, "%%llm_sql --explain"))
    audience = table_rows(html_of(cell_with(notebook, "%%llm_sql -o audience")))
    assert len(audience) == 16
    assert {row[-1] for row in audience} <= {"children", "adults only"}
    counts = table_rows(html_of(cell_with(notebook, 'audience.groupby(["Rating"')))
    assert sum(int(n) for row in counts for n in row[1:]) == 16


@pytest.mark.slow
def test_pandas_analysis(run_notebook):
    notebook = run_notebook("02_pandas_analysis.ipynb")
    listing = 'movies[["Title", "Year", "Genre", "Rating", "audience"]]'
    movies = table_rows(html_of(cell_with(notebook, listing)))
    assert len(movies) == 56
    assert {row[-1] for row in movies} <= {"children", "adults only"}
    stats = text_of(cell_with(notebook, "movies.llm.last_stats"))
    assert "num_rows=56, num_requests=56" in stats
    agreement = text_of(cell_with(notebook, "agreement ="))
    assert re.search(r"agrees with the MPAA rating on \d+% of the movies", agreement)
    assert num_figures(cell_with(notebook, "by_decade =")) == 1
    assert num_figures(cell_with(notebook, "by_genre =")) == 1
    answers = table_rows(html_of(cell_with(notebook, 'recent["Title"].llm.map(')))
    assert len(answers) == 8
    assert all(answer for _, answer in answers)


@pytest.mark.slow
def test_what_the_optimizer_buys(run_notebook):
    notebook = run_notebook("03_what_the_optimizer_buys.ipynb")
    assert num_figures(cell_with(notebook, "plan.plot()")) == 1
    compared = cell_with(notebook, "same = ")
    assert "same answers on both sides: True" in text_of(compared)
    sides = {row[0]: row for row in table_rows(html_of(compared))}
    assert list(sides) == ["naive", "llmudf"]
    sent = {side: int(row[2]) for side, row in sides.items()}  # after the index: seconds, sent
    assert 0 < sent["llmudf"] < sent["naive"]
    assert num_figures(cell_with(notebook, "fig, (tokens_ax, time_ax)")) == 1
