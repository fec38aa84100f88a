from llmudf.cli import main


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


def test_sql_explain_runs_no_model(tiny_model_path, capsys):
    query = "SELECT llm('Q', t) FROM (VALUES ('x'), ('x'), ('y')) v(t)"
    assert main(["sql", "--explain", query, "--model", tiny_model_path]) == 0
    assert "rows 3 -> 2 prompts after dedup" in capsys.readouterr().out
