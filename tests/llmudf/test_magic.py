"""`%load_ext llmudf` in a real IPython shell: `%%llm_sql` / `%llm_sql` over the shell's
DataFrames with the tiny model, `-o`, `--explain`, one-line errors; notebook progress bars
and the stats' HTML table."""

import io
import sys

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config as ShellConfig

import llmudf
import llmudf.magic
from llmudf.magic import MagicOptions, parse_line
from llmudf.optimizer.explain import LLMExplain
from llmudf.runtime.executor import CallStats, StatsTable
from llmudf.runtime.progress import BatchProgress, is_watched

TITLES = ["Up", "Heat", "Up", "Cars", "Heat", "Up"]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    hooks = sys.modules["__main__"], sys.displayhook, sys.excepthook
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        config = ShellConfig()
        config.HistoryManager.hist_file = ":memory:"
        shell = InteractiveShell.instance(config=config)
    # the shell puts its own __main__ and hooks in place: give the test process its own back
    sys.modules["__main__"], sys.displayhook, sys.excepthook = hooks
    shell.run_cell("%load_ext llmudf", store_history=False)
    yield shell
    llmudf.magic.configure(None)  # closes the notebook-wide connection
    InteractiveShell.clear_instance()


@pytest.fixture
def notebook(shell, make_config):
    llmudf.magic.configure(make_config(cache=False))
    shell.user_ns["movies"] = pd.DataFrame({"title": TITLES, "year": range(1990, 1996)})
    yield shell
    for name in ("movies", "answers", "plan"):
        shell.user_ns.pop(name, None)


def test_cell_magic_answers_over_a_notebook_dataframe(notebook):
    query = "SELECT year, title, llm('Genre?', title) AS genre FROM movies ORDER BY year"
    result = notebook.run_cell(f"%%llm_sql -o answers\n{query}", store_history=False)
    got = result.result
    assert result.success and isinstance(got, pd.DataFrame)
    assert notebook.user_ns["answers"] is got
    assert got["title"].tolist() == TITLES
    # the same answers as llmudf.connect() over the same DataFrame, from Python
    movies = notebook.user_ns["movies"]  # noqa: F841 - found by name
    con = llmudf.connect(config=llmudf.magic.connection().config)
    assert got["genre"].tolist() == con.sql(query).df()["genre"].tolist()
    stats = llmudf.magic.connection().last_stats
    assert isinstance(stats, StatsTable)
    assert (stats[0].num_rows, stats[0].num_requests) == (6, 3)  # Up, Heat, Cars


def test_line_magic_runs_a_one_line_query(notebook):
    result = notebook.run_cell(
        "%llm_sql SELECT count(*) AS n, count(DISTINCT title) AS k FROM movies",
        store_history=False,
    )
    assert result.result.to_dict("records") == [{"n": 6, "k": 3}]
    assert notebook.run_line_magic("llm_sql", "-o answers SELECT 1 AS a")["a"].tolist() == [1]
    assert notebook.user_ns["answers"]["a"].tolist() == [1]


def test_explain_shows_the_plan_without_running_the_model(notebook):
    plan = notebook.run_cell_magic(
        "llm_sql", "--explain -o plan", "SELECT llm('Genre?', title) FROM movies"
    )
    assert isinstance(plan, LLMExplain) and notebook.user_ns["plan"] is plan
    (site,) = plan.sites
    assert (site.num_rows, site.num_requests, site.unit) == (6, 3, "tokens")
    # the rows behind each distinct title count in the "original order" strategy
    assert [s.num_prompts for s in site.strategies] == [6, 3, 3]
    assert llmudf.magic.connection().last_stats == []
    html = plan._repr_html_()
    assert "<td>llm #1 in SELECT</td><td>Genre?</td><td>6</td><td>3</td>" in html


@pytest.mark.parametrize(
    "cell, message",
    [
        ("%%llm_sql\nSELECT * FROM nope", "Catalog Error: Table with name nope does not exist!"),
        (
            "%%llm_sql\nSELECT llm('Q', title, {'max_token': 3}) FROM movies",
            "llm #1 in SELECT: unknown option 'max_token'; did you mean 'max_tokens'?",
        ),
        ("%llm_sql SELECT 1 +", "Parser Error: syntax error at or near"),
        ("%llm_sql --bogus SELECT 1", "unknown option --bogus; options: -o NAME, --explain"),
    ],
)
def test_an_error_is_one_line(notebook, capsys, cell, message):
    result = notebook.run_cell(cell, store_history=False)
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert err.startswith(f"UsageError: {message}") and err.count("\n") == 1


def test_model_and_db_options_reconnect(notebook, tiny_model_path, tmp_path):
    before = llmudf.magic.connection()
    database = tmp_path / "notebook.duckdb"
    notebook.run_line_magic("llm_sql", f"--model {tiny_model_path} --db {database}")
    con = llmudf.magic.connection()
    assert con is not before and con.config.model == tiny_model_path
    assert con.config.engine == before.config.engine  # the rest of the Config is kept
    notebook.run_line_magic("llm_sql", "CREATE TABLE t AS SELECT 1 AS a")
    assert database.exists()
    notebook.run_line_magic("llm_sql", f"--db {database}")  # the same: nothing to redo
    assert llmudf.magic.connection() is con


def test_parse_line_takes_options_before_the_query():
    assert parse_line("--model '/a b/m.gguf' --db=x.db SELECT '-o'") == (
        MagicOptions(model="/a b/m.gguf", database="x.db"),
        "SELECT '-o'",
    )
    assert parse_line("-- a comment\nSELECT 1") == (MagicOptions(), "-- a comment\nSELECT 1")
    with pytest.raises(UsageError, match="--db needs a value"):
        parse_line("--db")
    with pytest.raises(UsageError, match="variable name"):
        parse_line("-o 1x SELECT 1")


def test_progress_bars_show_in_a_jupyter_kernel(shell, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert not is_watched()
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert not is_watched()  # an IPython shell without a kernel: a terminal's job
    monkeypatch.setattr(shell, "kernel", object(), raising=False)
    assert is_watched()
    with BatchProgress("llm #1", 10, 4, 1, enabled=True) as bar:
        assert not bar._bar.disable
    with BatchProgress("llm #1", 10, 4, 1, enabled=False) as bar:
        assert bar._bar.disable


def test_stats_are_a_list_with_an_escaped_html_table():
    stats = CallStats("llm #1 in <WHERE>", 1234, 56, 7, 49, 8900, 4500, 321, seconds=1.5)
    table = StatsTable([stats])
    assert table == [stats] and isinstance(table, list)
    html = table._repr_html_()
    assert "<WHERE>" not in html
    cells = ["llm #1 in &lt;WHERE&gt;", "1,234", "56", "7", "49", "8,900", "4,500", "321", "1.50"]
    assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in html
    assert "<th>prefix-cached tokens</th>" in html
