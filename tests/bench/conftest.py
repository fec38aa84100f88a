"""The benchmark scripts are not a package: `bench_module(name)` imports bench/<name>.py with
bench/ on sys.path (as `python bench/<name>.py` has it), under its own name."""

import importlib
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module


@pytest.fixture
def bench_dir() -> Path:
    return BENCH_DIR
