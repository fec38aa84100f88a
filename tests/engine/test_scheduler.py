"""Scheduler logic with a real KV pool and radix cache but no model: a "step" appends a token
that is a function of the sequence so far, so a corrupted or dropped request shows up."""

from llmudf.engine.config import EngineConfig
from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.request import Sequence
from llmudf.engine.sampling import SamplingParams
from llmudf.engine.scheduler import Scheduler


def make(num_pages=64, page_size=4, **cfg):
    config = EngineConfig(device="cpu", page_size=page_size, **cfg)
    pool = KVPool(KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=page_size), num_pages)
    return Scheduler(config, pool)


def seq(rid, tokens, max_tokens=3, arrival=0):
    return Sequence(rid, arrival, tokens, SamplingParams(max_tokens=max_tokens), max_len=1024)


def run(sched, on_step=None):
    """Drives the scheduler like the engine does; returns {request_id: generated ids}."""
    done = {}
    while sched.num_unfinished:
        batch = sched.schedule()
        assert batch.seqs, "no progress"
        if on_step:
            on_step(batch)
        sampling = [
            s
            for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if s.num_computed_tokens + n == len(s)
        ]
        sched.commit(batch)
        for s in sampling:
            s.token_ids.append(sum(s.token_ids) % 97)
            if s.num_generated_tokens == s.params.max_tokens:
                sched.finish(s)
                done[s.request_id] = s.generated_ids
    return done


def expected(tokens, max_tokens=3):
    tokens = list(tokens)
    for _ in range(max_tokens):
        tokens.append(sum(tokens) % 97)
    return tokens[-max_tokens:]


def test_token_budget_chunks_prefill_and_mixes_in_decodes():
    sched = make(max_num_batched_tokens=8)
    sched.add(seq("short", [1, 2], max_tokens=4))
    sched.add(seq("long", list(range(10, 40))))
    steps = []
    out = run(
        sched,
        lambda b: steps.append(
            {s.request_id: n for s, n in zip(b.seqs, b.num_new_tokens, strict=True)}
        ),
    )
    assert all(sum(step.values()) <= 8 for step in steps)
    assert steps[0] == {"short": 2, "long": 6}  # admitted in token order; long is chunked
    assert steps[1] == {"short": 1, "long": 7}  # a decode rides along with the next chunk
    assert out == {"short": expected([1, 2], 4), "long": expected(range(10, 40))}


def test_waiting_requests_are_admitted_in_token_order():
    sched = make(max_num_batched_tokens=3, max_num_seqs=1)
    prompts = {"c": [9, 1], "a": [1, 5], "b": [1, 7], "d": [1, 5, 0]}
    for i, (rid, toks) in enumerate(prompts.items()):
        sched.add(seq(rid, toks, max_tokens=1, arrival=i))
    order = []
    run(sched, lambda b: order.extend(s.request_id for s in b.seqs if s.request_id not in order))
    assert order == ["a", "d", "b", "c"]


def test_fcfs_keeps_arrival_order():
    sched = make(max_num_batched_tokens=3, max_num_seqs=1, schedule_policy="fcfs")
    for i, (rid, toks) in enumerate({"c": [9, 1], "a": [1, 5]}.items()):
        sched.add(seq(rid, toks, max_tokens=1, arrival=i))
    order = []
    run(sched, lambda b: order.extend(s.request_id for s in b.seqs if s.request_id not in order))
    assert order == ["c", "a"]


def test_shared_prefix_is_computed_once_within_a_batch():
    sched = make(max_num_batched_tokens=1000, min_shared_prefix_to_defer=8)
    shared = list(range(1, 41))
    reqs = [seq(f"r{i}", shared + [50 + i, 60 + i], max_tokens=2) for i in range(5)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["r0"]  # the others wait one step for its KV
    sched.add(seq("other", [90, 91, 92]))  # a prompt sharing nothing is not held back
    sched.commit(first)
    first.seqs[0].token_ids.append(0)
    second = sched.schedule()
    assert {s.request_id for s in second.seqs} == {"r0", "r1", "r2", "r3", "r4", "other"}
    assert [r.num_cached_tokens for r in reqs[1:]] == [40, 40, 40, 40]


def test_a_short_instruction_after_a_cached_system_prompt_is_computed_once():
    # a long-lived server already holds the system prompt; a query's instruction adds ~10
    # shared tokens, which the default look-ahead still computes once, not once per row
    sched = make(num_pages=256, page_size=1, max_num_batched_tokens=1000)
    system, instruction = list(range(1, 31)), list(range(100, 110))
    sched.add(seq("warm", system + [7], max_tokens=1))
    run(sched)
    reqs = [seq(f"r{i}", system + instruction + [200 + i], max_tokens=1) for i in range(6)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["r0"]
    sched.commit(first)
    first.seqs[0].token_ids.append(0)
    sched.schedule()
    assert [r.num_cached_tokens for r in reqs[1:]] == [40] * 5


def test_prefix_cache_is_shared_across_calls_and_off_switch():
    for enabled, cached in ((True, 8), (False, 0)):
        sched = make(enable_prefix_cache=enabled)
        sched.add(seq("a", list(range(1, 11))))
        run(sched)
        late = seq("b", list(range(1, 11)) + [42])
        sched.add(late)
        assert run(sched) == {"b": expected(list(range(1, 11)) + [42])}
        assert late.num_cached_tokens == cached


def test_kv_pressure_preempts_and_every_request_completes_correctly():
    # 12 pages of 4 tokens; 10 requests of ~14 tokens each need 40 pages at once
    sched = make(num_pages=12, page_size=4, max_num_batched_tokens=64)
    reqs = {f"r{i}": [i + 1] * 3 + list(range(20, 31)) for i in range(10)}
    for i, (rid, toks) in enumerate(reqs.items()):
        sched.add(seq(rid, toks, max_tokens=6, arrival=i))
    out = run(sched)
    assert out == {rid: expected(t, 6) for rid, t in reqs.items()}
    assert sched.num_preemptions > 0
    pool = sched.pool
    # every reference is the tree's now; evicting the whole cache frees the whole pool
    assert pool.num_free_pages + sched.cache.total_size // 4 == pool.num_pages
    sched.cache.evict(pool.num_pages)
    assert pool.num_free_pages == pool.num_pages
    assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))


def test_finish_of_a_waiting_request_releases_it():
    sched = make()
    waiting = seq("w", [1, 2, 3])
    sched.add(waiting)
    sched.finish(waiting)
    assert sched.num_unfinished == 0 and waiting.is_finished
