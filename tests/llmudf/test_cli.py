import datetime
import subprocess
import sys

import duckdb
import pytest

from llmudf.cli import DEFAULT_MODEL_NOTE, DEMO_QUERIES, main
from llmudf.runtime import paths
from llmudf.runtime.client import InProcessClient


def test_sql_prints_the_result_table_and_stats(tiny_model_path, capsys, tmp_path):
    query = (
        "SELECT t, llm_filter('Keep?', t) AS keep FROM (VALUES ('a long title about rain'), "
        "('a long title about rain'), ('another film about the sea')) v(t)"
    )
    db = str(tmp_path / "x.duckdb")
    assert main(["sql", query, "--db", db, "--model", tiny_model_path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split(" | ")[0].strip() == "t" and out[0].split(" | ")[1].strip() == "keep"
    assert len([line for line in out if "a long title about rain" in line]) == 2
    assert "llm_filter #1 in SELECT: 3 rows -> 2 prompts" in "\n".join(out)


def test_sql_explain_runs_no_model(tiny_model_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("--explain loaded the model")

    monkeypatch.setattr("llmudf.engine.weights.load_model", no_model)
    query = "SELECT llm('Q', t) FROM (VALUES ('x'), ('x'), ('y')) v(t)"
    assert main(["sql", "--explain", query, "--model", tiny_model_path]) == 0
    assert "rows 3 -> 2 prompts after dedup" in capsys.readouterr().out


def test_usage_error_is_one_line_and_exits_2(capsys):
    assert main(["sql"]) == 2
    assert capsys.readouterr().err == (
        "llmudf: error: the following arguments are required: query (see `llmudf sql --help`)\n"
    )
    assert main(["demo", "--rows", "x"]) == 2
    assert capsys.readouterr().err == (
        "llmudf: error: argument --rows: invalid int value: 'x' (see `llmudf demo --help`)\n"
    )


def test_runtime_error_is_one_line_and_exits_1():
    # through the console entry point: sys.exit(main()), no traceback
    cmd = [sys.executable, "-m", "llmudf.cli", "sql", "SELECT * FROM nope"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == "llmudf: error: Catalog Error: Table with name nope does not exist!\n"
    assert done.stdout == ""


def test_error_lines_drop_sqlglot_and_duckdb_detail(tiny_model_path, capsys):
    query = "SELECT llm('Q', t) FROM (VALUES ('x')) v(t) WHERE"
    assert main(["sql", "--explain", "SELECT ...", "--model", tiny_model_path]) == 1
    err = capsys.readouterr().err
    assert err == (
        "llmudf: error: sqlglot cannot parse the query: "
        "Invalid expression / Unexpected token. Line 1, Col: 8.\n"
    )
    assert main(["sql", query, "--model", tiny_model_path]) == 1
    err = capsys.readouterr().err  # DuckDB's message goes on with the query and a caret
    assert err.startswith("llmudf: error: Parser Error: syntax error") and err.count("\n") == 1


def test_debug_prints_the_traceback_before_or_after_the_command(tiny_model_path, capsys):
    for argv in (
        ["--debug", "sql", "SELECT * FROM nope"],
        ["sql", "SELECT * FROM nope", "--debug"],
    ):
        assert main([*argv, "--model", tiny_model_path]) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):")
        assert "CatalogException: Catalog Error: Table with name nope does not exist!" in err
        assert "llmudf: error:" not in err


def test_a_command_s_own_exit_message_is_an_error_line(capsys):
    assert main(["serve", "--engine-json", "[1]"]) == 1
    err = capsys.readouterr().err
    assert err == "llmudf: error: --engine-json must be a JSON object, got '[1]'\n"


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmudf.datasets.movies", interrupted)
    assert main(["demo", "--save", str(tmp_path / "m.duckdb")]) == 130
    assert capsys.readouterr().err == "llmudf: interrupted\n"
    assert main(["--debug", "demo", "--save", str(tmp_path / "m.duckdb")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith("KeyboardInterrupt")


def test_db_names_a_missing_file_once(tiny_model_path, tmp_path, capsys):
    db = tmp_path / "new.duckdb"
    argv = ["sql", "CREATE TABLE IF NOT EXISTS t AS SELECT 42 AS x", "--db", str(db)]
    assert main([*argv, "--model", tiny_model_path]) == 0
    assert capsys.readouterr().err == (
        f"llmudf: {db} does not exist, creating a new DuckDB database\n"
    )
    assert main(["sql", "SELECT x FROM t", "--db", str(db), "--model", tiny_model_path]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[2].strip() == "42"


def test_demo_save_writes_typed_tables(tmp_path, capsys):
    db = tmp_path / "movies.duckdb"
    assert main(["demo", "--save", str(db), "--rows", "5"]) == 0
    assert capsys.readouterr().out == f"Wrote omdb (5 rows), tomatoes (5 rows) to {db}\n"
    with duckdb.connect(str(db)) as con:
        types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE omdb)").fetchall())
        rows = con.sql("SELECT ID, Title, Year, Runtime, Released FROM omdb ORDER BY ID").fetchall()
        joined = con.sql("SELECT COUNT(*) FROM omdb JOIN tomatoes USING (ID)").fetchall()
    assert (types["Year"], types["Runtime"], types["Released"]) == ("BIGINT", "BIGINT", "DATE")
    assert rows[0] == (372, "We Live in Public", 2009, 90, datetime.date(2009, 1, 19))
    assert joined == [(5,)]


def test_demo_loads_the_model_before_timing_queries(tiny_model_path, monkeypatch, capsys):
    built_before_generate = []
    generate = InProcessClient.generate

    def recording_generate(self, *args, **kwargs):
        built_before_generate.append(self._engine is not None)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(
        "llmudf.runtime.client._CLIENTS", {}
    )  # a fresh client: the model not loaded
    monkeypatch.setattr(InProcessClient, "generate", recording_generate)
    assert main(["demo", "--model", tiny_model_path, "--rows", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Loaded 6 rated movies (tables omdb, tomatoes) from {paths.movies_db()}"
    assert out[1] == f"Model: {tiny_model_path}"
    assert out[2].startswith("Model loaded on cpu in ") and "not in the timings below" in out[2]
    assert [line for line in out if line.startswith("-- ")] == [f"-- {t}" for t, _ in DEMO_QUERIES]
    stats = [line for line in out if " rows -> " in line]
    assert len(stats) == 3 and all("tokens/s" in line for line in stats)
    assert built_before_generate and all(built_before_generate)


@pytest.mark.slow
def test_demo_says_the_default_model_is_tiny(capsys):
    assert main(["demo", "--rows", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == DEFAULT_MODEL_NOTE
    assert "SmolLM2-135M" in out[1] and "--model PATH" in out[1]
