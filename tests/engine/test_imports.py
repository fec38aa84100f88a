"""What callers that need no model import must not pull in torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "llmudf.engine.params",
        "llmudf.engine.prompts",
        "llmudf.engine.flight_client",
        "llmudf.runtime.openai_client",
        "llmudf.runtime.executor",
    ],
)
def test_importing_loads_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
