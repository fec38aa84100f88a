import doctest

import pytest

import llmudf.optimizer
from llmudf.optimizer import (
    callsite,
    exact,
    explain,
    ggr,
    metrics,
    plan,
    reduce,
    reduce_sql,
    rewrite,
)

# the optimizer's public modules, each with examples in its docstrings
MODULES = [
    llmudf.optimizer,
    callsite,
    exact,
    explain,
    ggr,
    metrics,
    plan,
    reduce,
    reduce_sql,
    rewrite,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{module.__name__} has no examples to check"
    assert result.failed == 0
