"""bench/_common.py: alternating timed runs, medians, and the check that answers vary."""

import pytest


def test_alternate_interleaves_sides_and_prepares_each_run(bench_module):
    common = bench_module("_common")
    calls = []
    runs = common.alternate(
        {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or 0},
        repeat=3,
        prepare=lambda name: calls.append(f"prepare {name}"),
    )
    assert calls == ["prepare a", "a", "prepare b", "b"] * 3
    assert runs["a"].results == [2, 6, 10] and len(runs["b"].seconds) == 3
    with pytest.raises(ValueError, match="repeat"):
        common.alternate({"a": lambda: None}, repeat=0)


def test_runs_median_and_spread(bench_module):
    runs = bench_module("_common").Runs(seconds=[1.0, 4.0, 2.0], cpu_seconds=[1, 1, 1])
    assert runs.median == 2.0 and runs.spread == 1.5
    assert runs.summary()["runs_s"] == [1.0, 4.0, 2.0]
    assert "median 2.00 s" in runs.describe()


def test_checks_fail_on_answers_that_do_not_vary(bench_module, capsys):
    common = bench_module("_common")
    checks = common.Checks()
    assert checks.require_varying("mood", ["calm", " calm", "tense", "sad"]) == 3
    checks.exit_if_failed()  # nothing failed
    assert checks.require_varying("continent", ["Europe", "Europe ", "Asia"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        checks.exit_if_failed()
    assert exit_info.value.code == 1
    assert "continent: only 2 distinct answer(s), need >= 3" in capsys.readouterr().err
