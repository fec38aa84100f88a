"""Fixtures for the public face: a tiny random-init model (fast) behind llmudf Configs.

`tiny_model_path`: a HF folder of the engine tests' tiny llama (byte-level tokenizer).
`tiny_config`: a Config on that model, CPU, with its own result cache and no progress bar.
`make_config(**overrides)`: the same with other options.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmudf.config import Config


def _engine_fixtures():
    path = Path(__file__).parents[1] / "engine" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_llmudf_engine_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    helpers = _engine_fixtures()
    tokenizer_dir = tmp_path_factory.mktemp("llmudf_tiny_tokenizer")
    helpers.write_tiny_tokenizer(tokenizer_dir)
    folder = tmp_path_factory.mktemp("llmudf_tiny_model")
    helpers.write_tiny_model(folder, "llama", 1, tokenizer_dir)  # seed 1: answers vary
    return str(folder)


@pytest.fixture
def make_config(tiny_model_path, tmp_path):
    def make(**overrides) -> Config:
        options = {
            "model": tiny_model_path,
            "engine": {"device": "cpu", "kv_cache_bytes": 64 << 20},
            "cache_dir": str(tmp_path / "results"),
            "progress": False,
            "max_tokens": 6,
        }
        return Config(**{**options, **overrides})

    return make


@pytest.fixture
def tiny_config(make_config) -> Config:
    return make_config()
