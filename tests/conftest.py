import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_result_cache(tmp_path_factory):
    """Each test run gets its own LLM result cache; the dequantized-model cache is shared, so
    only the first run on a machine pays for converting the default model's GGUF."""
    if "LLMUDF_RESULT_CACHE_DIR" not in os.environ:
        os.environ["LLMUDF_RESULT_CACHE_DIR"] = str(tmp_path_factory.mktemp("results"))
    yield
