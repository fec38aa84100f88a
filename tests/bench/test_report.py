"""bench/_common.py's result files and bench/report.py's README table built from them."""

import json

import pytest


def _write(common, tmp_path, name="engine", **kwargs):
    payload = {"speedup": 2.75, "identical": True, "nested": {"x": 1}, "label": "text"}
    return common.write_result(name, payload, results_dir=tmp_path, **kwargs)


def test_write_result_records_machine_versions_commit(bench_module, tmp_path):
    common = bench_module("_common")
    path = _write(common, tmp_path, targets={"speedup": ">= 2.5"})
    record = json.loads(path.read_text())
    assert path == tmp_path / "engine.json"
    assert record["name"] == "engine"
    # the default headline: every top-level number and bool of the payload
    assert record["headline"] == {"speedup": 2.75, "identical": True}
    assert record["result"]["nested"] == {"x": 1}
    assert record["machine"]["num_cores"] >= 1 and record["machine"]["cpu"]
    assert record["versions"]["python"].count(".") == 2
    if (common.REPO_DIR / ".git").exists():
        assert len(record["git_commit"].removesuffix("-dirty")) == 40
    assert record["date"][:2] == "20" and record["command"].startswith("python ")


def test_write_result_rejects_bad_names_and_targets(bench_module, tmp_path):
    common = bench_module("_common")
    with pytest.raises(ValueError, match="result name"):
        _write(common, tmp_path, name="../x")
    with pytest.raises(ValueError, match="not in the headline"):
        _write(common, tmp_path, targets={"missing": ">= 1"})


def test_target_met(bench_module):
    report = bench_module("report")
    assert report.target_met(2.5, ">= 2.5") and not report.target_met(2.49, ">= 2.5")
    assert report.target_met(True, "== true") and not report.target_met(False, "== true")
    assert not report.target_met(None, ">= 1")
    with pytest.raises(ValueError, match="op one of"):
        report.target_met(1, "at least 2")
    # relative to another headline number
    assert report.target_met(0.93, ">= 0.95 * recall_a", {"recall_a": 0.97})
    assert not report.target_met(0.9, ">= 0.95 * recall_a", {"recall_a": 0.97})
    with pytest.raises(ValueError, match="'recall_c' is neither a number"):
        report.target_met(0.9, ">= 0.95 * recall_c", {"recall_a": 0.97})


def test_table_one_row_per_headline_number(bench_module, tmp_path):
    common, report = bench_module("_common"), bench_module("report")
    _write(common, tmp_path, headline={"speedup": 2.0, "identical": True},
           targets={"speedup": ">= 2.5"})  # fmt: skip
    _write(common, tmp_path, name="query", headline={"phr": 0.875})
    table = report.render_table(report.load_results(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| `engine` | speedup | 2 | >= 2.5 **not met** |",
        "|  | identical | true |  |",
        "| `query` | phr | 0.875 |  |",
    ]
    assert "- `query`: `python " in table and "cores" in table


def test_main_rewrites_only_the_marked_block_and_check_sees_staleness(bench_module, tmp_path):
    common, report = bench_module("_common"), bench_module("report")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    results = tmp_path / "results"
    _write(common, results, headline={"speedup": 3.0})
    args = ["--results-dir", str(results), "--readme", str(readme)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{report.START}\n| benchmark |") and text.endswith(
        f"{report.END}\noutro\n"
    )
    assert "old table" not in text and "| `engine` | speedup | 3 |" in text
    assert report.main([*args, "--check"]) == 0


def test_bad_result_files_and_missing_markers_are_clear_errors(bench_module, tmp_path):
    report = bench_module("report")
    (tmp_path / "x.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="not a benchmark result"):
        report.load_results(tmp_path)
    with pytest.raises(ValueError, match="no <!-- bench-results:start -->"):
        report.replace_block("no markers here", "table")
    assert "No results yet" in report.render_table([])
