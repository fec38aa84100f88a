import os

# before anything imports torch: see llmudf/__init__.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_result_cache(tmp_path_factory):
    """Each test run gets its own LLM result cache; the dequantized-model cache is shared, so
    only the first run on a machine pays for converting the default model's GGUF."""
    if "LLMUDF_RESULT_CACHE_DIR" not in os.environ:
        os.environ["LLMUDF_RESULT_CACHE_DIR"] = str(tmp_path_factory.mktemp("results"))
    yield
