import pyarrow as pa
import pytest

from llmudf.calls.functions import LLMCallError, bind_call
from llmudf.runtime.cache import ResultCache
from llmudf.runtime.client import get_client
from llmudf.runtime.executor import run_call

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
    assert len(set(a.to_pylist())) > 1  # answers vary, so the equality means something
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


class Interrupting:
    """A client whose engine's progress callback raises `error` once `after` prompts are
    answered, as Ctrl-C would; `num_answered` is how many were answered by then."""

    def __init__(self, client, error: BaseException, after: int = 3):
        self.client, self.error, self.after = client, error, after
        self.num_answered = 0

    @property
    def model_id(self) -> str:
        return self.client.model_id

    def generate(self, prompts, params, progress=None, on_output=None):
        def interrupt(num_done, num_total):
            if num_done >= self.after:
                self.num_answered = num_done
                raise self.error

        return self.client.generate(prompts, params, progress=interrupt, on_output=on_output)


MOVIES = pa.table(
    {"title": [f"movie number {i}" for i in range(12)], "year": list(range(1990, 2002))}
)


@pytest.mark.parametrize(
    ("error", "raised"),
    [(KeyboardInterrupt(), KeyboardInterrupt), (RuntimeError("server lost"), LLMCallError)],
    ids=["ctrl-c", "error"],
)
def test_an_interrupted_call_keeps_its_answers_and_a_rerun_sends_only_the_rest(
    make_config, tmp_path, error, raised
):
    # two sequences at a time: the answers finish over several steps
    config = make_config(engine={"device": "cpu", "kv_cache_bytes": 64 << 20, "max_num_seqs": 2})
    spec = bind_call("llm")
    client = get_client(config)
    cache = ResultCache(tmp_path / "interrupted")
    interrupting = Interrupting(client, error)
    with pytest.raises(raised) as info:
        run_call(spec, "Q", MOVIES, config, interrupting, cache)
    if raised is LLMCallError:
        assert "RuntimeError: server lost" in str(info.value) and info.value.__cause__ is error
    num_answered = interrupting.num_answered
    assert 3 <= num_answered < 12
    assert len(cache) == num_answered
    assert client.engine.num_unfinished == 0
    rerun = run_call(spec, "Q", MOVIES, config, client, cache)  # the same engine, reused
    assert (rerun.stats.num_cache_hits, rerun.stats.num_sent) == (num_answered, 12 - num_answered)
    uninterrupted = make_config()  # another engine, no result cache
    fresh = run_call(spec, "Q", MOVIES, uninterrupted, get_client(uninterrupted))
    assert rerun.answers.equals(fresh.answers)
    assert len(set(fresh.answers.to_pylist())) > 1
