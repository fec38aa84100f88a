import pyarrow as pa
import pytest

from llmudf.cache import ResultCache
from llmudf.client import get_client
from llmudf.executor import run_call
from llmudf.functions import bind_call

TITLES = [
    "a long title about a detective in a rainy city",
    "a long title about a detective in a rainy city",
    "an animated story of a house lifted by balloons",
    None,
    "a quiet drama about two brothers and a farm",
]


@pytest.fixture
def fields():
    return pa.table({"title": TITLES, "year": [1990, 1990, 2009, 2001, 1999]})


def test_duplicates_are_sent_once_and_fanned_out(tiny_config, fields):
    result = run_call(bind_call("llm"), "Q", fields, tiny_config, get_client(tiny_config))
    answers = result.answers.to_pylist()
    assert len(answers) == 5 and answers[0] == answers[1]
    assert (result.stats.num_rows, result.stats.num_requests, result.stats.num_sent) == (5, 4, 4)
    assert result.stats.num_prompt_tokens > result.stats.num_cached_tokens > 0


def test_answers_do_not_depend_on_the_plan(make_config, fields):
    spec = bind_call("llm_choice", ["red", "green", "blue"])
    optimized = make_config()
    naive = make_config(dedup=False, reorder_rows=False)
    a = run_call(spec, "Q", fields, optimized, get_client(optimized)).answers
    b = run_call(spec, "Q", fields, naive, get_client(naive))
    assert a.to_pylist() == b.answers.to_pylist()
    assert b.stats.num_sent == 5


def test_cache_answers_a_rerun_without_the_engine(tiny_config, fields, tmp_path):
    cache = ResultCache(tmp_path)
    spec = bind_call("llm_filter")
    client = get_client(tiny_config)
    first = run_call(spec, "Keep?", fields, tiny_config, client, cache)
    again = run_call(spec, "Keep?", fields, tiny_config, client, cache)
    assert again.answers.equals(first.answers)
    assert (again.stats.num_cache_hits, again.stats.num_sent) == (4, 0)
    assert again.stats.num_prompt_tokens == 0


def test_per_row_instructions_and_null_instruction(tiny_config, fields):
    instructions = ["Q1", "Q1", "Q2", "Q2", None]
    result = run_call(
        bind_call("llm_score"), instructions, fields, tiny_config, get_client(tiny_config)
    )
    scores = result.answers.to_pylist()
    assert scores[4] is None and all(s in (1.0, 2.0, 3.0, 4.0, 5.0) for s in scores[:4])
    assert result.answers.type == pa.float64()
