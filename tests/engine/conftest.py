import pytest

from llmudf.engine.weights import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, ModelConfig, Tokenizer) of the tiny llama, loaded once per test module."""
    return load_model(tiny_model_dir)
