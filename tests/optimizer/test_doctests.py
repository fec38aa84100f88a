import doctest

import pytest

import llmudf.optimizer
from llmudf.optimizer import encode, exact, ggr, metrics, plan


@pytest.mark.parametrize("module", [llmudf.optimizer, encode, exact, ggr, metrics, plan])
def test_docstring_examples_hold(module):
    result = doctest.testmod(module)
    assert result.failed == 0
