"""Small runs of the benchmarks on the default model (slow): each writes its result file
with the fields bench/report.py reads, and its own checks pass."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(bench_dir, script: str, *args: str, results_dir) -> dict:
    cmd = [sys.executable, str(bench_dir / script), *args, "--results-dir", str(results_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=bench_dir.parent, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((results_dir / f"{script.removesuffix('.py')}.json").read_text())


def test_engine_bench_small(bench_dir, tmp_path):
    args = ["--num-prompts", "12", "--batch-sizes", "4,12", "--repeat", "1"]
    record = _run(bench_dir, "engine.py", *args, results_dir=tmp_path)
    result = record["result"]
    assert set(result["hf_batch_sweep_rows_per_s"]) == {"4", "12"}
    assert result["identical_b_c"] is True and result["distinct_answers"] >= 3
    assert 0 < result["fraction_of_roofline"] <= 1.0
    assert result["sides"]["engine_cache"]["gflop"] < result["sides"]["engine_no_cache"]["gflop"]
    assert "llama_cpp" in result or "speedup_vs_llama_cpp" in result
    assert record["targets"]["fraction_of_roofline"] == ">= 0.85"


def test_query_bench_small(bench_dir, tmp_path):
    args = ["--rows", "30", "--repeat", "1", "--queries", "projection,mood_per_movie"]
    record = _run(bench_dir, "query.py", *args, results_dir=tmp_path)
    queries = record["result"]["queries"]
    assert queries["projection"]["sent"][1] < queries["projection"]["sent"][0]  # dedup
    assert queries["mood_per_movie"]["sent"] == [30, 30]  # one prompt per movie
    assert all(q["identical"] and q["distinct_answers"] >= 3 for q in queries.values())
