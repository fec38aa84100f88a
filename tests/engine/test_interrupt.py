"""Faults inside `Engine.generate`: whatever raises (a callback, the model, Ctrl-C), the batch's
requests are aborted, their KV pages and cache locks given back, and the next batch is answered
exactly as by a fresh engine. Also: a max_tokens past the context is capped with a warning."""

import warnings

import pytest
from test_engine import make_engine, prompts

from llmudf.engine.sampling import SamplingParams

# one more token each, EOS ignored: the requests finish in different steps
PARAMS = [SamplingParams(max_tokens=2 + i, ignore_eos=True) for i in range(12)]


@pytest.fixture(scope="module")
def expected(tiny):
    """The answers of a fresh engine that nothing interrupts."""
    return [o.token_ids for o in make_engine(tiny).generate(prompts(), PARAMS)]


def cached_pages(engine) -> list[int]:
    """The pages the radix cache holds; fails if any cache node is still locked."""
    cache = engine.scheduler.cache
    if cache is None:
        return []
    assert cache.protected_size == 0
    pages, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        assert node.lock_ref == 0
        pages += node.value or []  # None: the node is in the host tier only
        stack += node.children.values()
    return pages


def assert_idle(engine) -> None:
    """No request left, and every KV page either free or held once by the cache alone."""
    assert engine.num_unfinished == 0
    pool = engine.pool
    pages = cached_pages(engine)
    assert len(set(pages)) == len(pages)
    assert [pool.ref_count(p) for p in pages] == [1] * len(pages)
    assert pool.num_free_pages == pool.num_pages - len(pages)
    if engine.scheduler.cache is not None:
        engine.scheduler.cache.evict(pool.num_pages)
    assert pool.num_free_pages == pool.num_pages


def interrupt_from_progress(engine, monkeypatch):
    def progress(num_done, num_total):
        if num_done >= 3:
            raise KeyboardInterrupt

    return progress, KeyboardInterrupt


def interrupt_from_model(engine, monkeypatch):
    """The first forward pass after 3 answers fails: its batch was scheduled (KV pages
    reserved, cache prefixes locked) but never ran."""
    run = engine.runner.run

    def failing_run(batch):
        if engine.stats.num_requests >= 3:
            raise RuntimeError("device lost")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", failing_run)
    return None, RuntimeError


@pytest.mark.parametrize("interrupt", [interrupt_from_progress, interrupt_from_model])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(page_size=4, max_num_batched_tokens=37),  # mid-prefill chunks, partial pages
        dict(page_size=4, num_kv_pages=55),  # KV pressure: preempted before the interrupt
        dict(enable_prefix_cache=False, page_size=4),
    ],
    ids=["cache", "chunked", "preempting", "nocache"],
)
def test_interrupted_generate_leaves_the_engine_idle(tiny, expected, cfg, interrupt, monkeypatch):
    engine = make_engine(tiny, **cfg)
    progress, error = interrupt(engine, monkeypatch)
    finished = {}
    with pytest.raises(error):
        engine.generate(prompts(), PARAMS, progress=progress, on_output=finished.__setitem__)
    assert 0 < len(finished) < 12
    assert engine.stats.num_preemptions > 0 or "num_kv_pages" not in cfg
    assert {i: o.token_ids for i, o in finished.items()} == {i: expected[i] for i in finished}
    assert_idle(engine)
    monkeypatch.undo()
    answers = engine.generate(prompts(), PARAMS)
    assert [o.token_ids for o in answers] == expected
    assert_idle(engine)


def test_on_output_hears_of_each_answer_before_progress_counts_it(tiny):
    engine = make_engine(tiny)
    heard, events = {}, []

    def on_output(index, output):
        heard[index] = output
        events.append("output")

    def progress(num_done, num_total):
        assert num_done == events.count("output")
        events.append("progress")

    outs = engine.generate(prompts(), PARAMS, progress=progress, on_output=on_output)
    assert sorted(heard) == list(range(12))
    assert all(heard[i] is out for i, out in enumerate(outs))
    assert events.count("progress") > 1  # answers came over several steps


def test_a_prompt_that_cannot_be_queued_leaves_nothing_queued(tiny, expected):
    engine = make_engine(tiny)
    bad = SamplingParams(json_schema={"type": "array"})  # rejected when its request is added
    with pytest.raises(ValueError, match="object schema"):
        engine.generate(prompts(), PARAMS[:5] + [bad] + PARAMS[6:])
    assert_idle(engine)
    assert [o.token_ids for o in engine.generate(prompts(), PARAMS)] == expected


def test_max_tokens_past_the_context_is_capped_with_a_warning(tiny):
    engine = make_engine(tiny, max_model_len=64)
    texts = ["hi", "hello there", "a somewhat longer prompt"]
    huge = SamplingParams(max_tokens=10**6, ignore_eos=True)
    with pytest.warns(UserWarning) as record:
        outs = engine.generate(texts, huge)
    assert [str(w.message) for w in record] == [
        "max_tokens=1000000 is more than the model's context of 64 tokens; capped at 64"
    ]
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at_cap = engine.generate(texts, SamplingParams(max_tokens=64, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in at_cap]
    for o in outs:
        assert o.finish_reason == "length"
        assert o.num_prompt_tokens + o.num_generated_tokens == 64
    with pytest.warns(UserWarning, match="max_tokens=65 is more .* capped at 64"):
        engine.add_request("hi", SamplingParams(max_tokens=65))
