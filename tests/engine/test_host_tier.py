"""The host KV tier under the radix cache: write-back on eviction, load-back on a hit, both
tiers' LRU, locks across tiers, and exact copies (the K/V a hit returns is the K/V stored)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import GREEDY8, assert_same, make_engine, prompts
from test_scheduler import expected, run, seq

from llmudf.engine.config import EngineConfig
from llmudf.engine.host_kv import HostKVPool, KVCopier
from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.radix_cache import RadixCache
from llmudf.engine.sampling import SamplingParams


def make_cache(num_pages=8, num_host_pages=16, page_size=1):
    shape = KVShape(num_layers=2, num_kv_heads=1, head_dim=1, page_size=page_size)
    pool = KVPool(shape, num_pages)
    copier = KVCopier(pool, HostKVPool(shape, num_host_pages))
    return RadixCache(pool, page_size, copier), pool, copier.host_pool


def kv_code(prefix) -> float:
    """The K value token i of `prefix` has when computed after prefix[:i] (any function of
    the prefix will do: a copy that moves or mixes pages changes it)."""
    return float(hash(tuple(prefix)) % 100_003)


def put(cache, pool, tokens) -> int:
    """What a request does: fresh pages (evicting if short), its K/V written, inserted, its
    own references dropped. Returns the tokens that were already cached."""
    ps = cache.page_size
    num_pages = len(tokens) // ps
    short = num_pages - pool.num_free_pages
    if short > 0:
        cache.evict(short)
    pages = pool.allocate(num_pages)
    for layer, (k, v) in enumerate(pool.kv_caches):
        for i in range(num_pages * ps):
            code = kv_code(tokens[: i + 1]) + layer
            k[pages[i // ps], i % ps] = code
            v[pages[i // ps], i % ps] = -code
    cached = cache.insert(tokens, pages)
    pool.dec_ref(pages)
    return cached


def check_kv(pool, pages, tokens):
    ps = pool.page_size
    for layer, (k, v) in enumerate(pool.kv_caches):
        for i in range(len(pages) * ps):
            code = kv_code(tokens[: i + 1]) + layer
            assert k[pages[i // ps], i % ps].item() == code
            assert v[pages[i // ps], i % ps].item() == -code


def test_evicted_prefix_is_written_back_and_loaded_back_exactly():
    cache, pool, host = make_cache(num_pages=8)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    put(cache, pool, a)
    put(cache, pool, b)  # needs 6 pages, 2 free: `a` goes to the host
    match = cache.match_prefix(a)
    assert (match.num_tokens, match.num_host_tokens) == (0, 6)
    assert cache.host_size >= 4 and host.num_used_pages == cache.host_size
    assert cache.load_back(match)  # `b` is written back in turn to make room
    assert (match.num_tokens, match.num_host_tokens, match.host_node) == (6, 0, None)
    check_kv(pool, match.pages, a)
    assert cache.num_loaded_tokens == 6
    again = cache.match_prefix(b)
    assert again.num_tokens + again.num_host_tokens == 6
    assert cache.load_back(again)
    check_kv(pool, again.pages, b)


def test_a_node_on_both_tiers_is_evicted_without_a_copy_and_host_copies_go_lru():
    cache, pool, host = make_cache(num_pages=4, num_host_pages=4)
    put(cache, pool, [1, 2, 3, 4])
    put(cache, pool, [5, 6, 7, 8])  # [1..4] -> host
    match = cache.match_prefix([1, 2, 3, 4])
    assert cache.load_back(match)  # [5..8] -> host (host holds 8 tokens? no: 4 pages)
    written = cache.num_written_tokens
    assert match.last_node.host_value is not None  # loaded, its host copy kept
    cache.evict(4)  # [1..4] is on both tiers: dropping its device copy copies nothing
    assert cache.num_written_tokens == written
    assert cache.match_prefix([1, 2, 3, 4]).num_host_tokens == 4
    # the host tier is full; a new write-back evicts the least recently used host copy
    put(cache, pool, [9, 9, 9, 9])
    put(cache, pool, [8, 8, 8, 8])
    assert cache.match_prefix([1, 2, 3, 4]).num_host_tokens == 0
    assert cache.match_prefix([9, 9, 9, 9]).num_host_tokens == 4


def test_locked_nodes_never_leave_the_device_and_counts_return_to_zero():
    cache, pool, host = make_cache(num_pages=8, num_host_pages=8)
    put(cache, pool, [1, 2, 3, 4, 5])
    locked = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(locked)
    put(cache, pool, [6, 7, 8, 9, 10])  # only [4, 5] may leave the device
    put(cache, pool, [11, 12, 13])
    match = cache.match_prefix([1, 2, 3, 4, 5])
    assert (match.num_tokens, match.num_host_tokens) == (3, 2)
    check_kv(pool, match.pages, [1, 2, 3])
    assert cache.protected_size == 3
    cache.evict_host(100)  # a locked node keeps its host copy too
    cache.dec_lock_ref(locked)
    assert cache.load_back(cache.match_prefix([6, 7, 8, 9, 10])) is True
    cache.evict(100)
    cache.evict_host(100)
    assert not cache.root.children
    assert (cache.total_size, cache.host_size) == (0, 0)
    assert pool.num_free_pages == pool.num_pages and host.num_free_pages == host.num_pages
    assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))


def test_a_load_that_cannot_fit_leaves_the_match_as_it_was():
    cache, pool, _ = make_cache(num_pages=4, num_host_pages=8)
    put(cache, pool, [1, 2, 3, 4])
    put(cache, pool, [5, 6, 7, 8])
    cache.evict(1)  # [5..8] goes to the host too
    held = pool.allocate(1)  # a running request's page: the device cannot hold 4 more
    match = cache.match_prefix([1, 2, 3, 4])
    assert match.num_host_tokens == 4
    assert not cache.load_back(match)
    assert (match.num_tokens, match.num_host_tokens) == (0, 4)
    pool.dec_ref(held)
    assert cache.load_back(match) and match.num_tokens == 4


def test_insert_over_host_nodes_takes_the_callers_pages():
    cache, pool, _ = make_cache(num_pages=6)
    put(cache, pool, [1, 2, 3, 4])
    put(cache, pool, [5, 6, 7, 8, 9, 10])  # [1..4] -> host
    assert put(cache, pool, [1, 2, 3, 4, 5]) == 4  # recomputed: back on the device
    match = cache.match_prefix([1, 2, 3, 4, 5])
    assert (match.num_tokens, match.num_host_tokens) == (5, 0)
    check_kv(pool, match.pages, [1, 2, 3, 4, 5])


def test_a_host_tier_needs_a_device_pool_and_a_matching_shape():
    cache, pool, host = make_cache()
    with pytest.raises(ValueError, match="device pool"):
        RadixCache(None, 1, KVCopier(pool, host))
    other = KVShape(num_layers=1, num_kv_heads=1, head_dim=1, page_size=1)
    with pytest.raises(ValueError, match="shape"):
        KVCopier(pool, HostKVPool(other, 4))
    with pytest.raises(RuntimeError, match="already free"):
        host.free([0])


def test_host_pool_from_config():
    shape = KVShape(num_layers=2, num_kv_heads=1, head_dim=4, page_size=1)
    pool = KVPool(shape, 10)
    per_page = shape.bytes_per_page(torch.float32)
    sized = HostKVPool.from_config(
        EngineConfig(device="cpu", host_kv_cache_bytes=7 * per_page), pool
    )
    assert sized.num_pages == 7
    assert HostKVPool.from_config(EngineConfig(device="cpu"), pool).num_pages == 20  # 2x
    assert HostKVPool.from_config(EngineConfig(device="cpu", host_kv_cache_bytes=0), pool) is None
    with pytest.raises(ValueError, match="holds no page"):
        HostKVPool.from_config(EngineConfig(device="cpu", host_kv_cache_bytes=1), pool)
    with pytest.raises(ValueError, match="host_kv_cache_bytes"):
        EngineConfig(host_kv_cache_bytes=-1)
    with pytest.raises(ValueError, match="cpu_attention_offload"):
        EngineConfig(host_kv_cache_bytes=0, cpu_attention_offload=True)


# ---- random operation sequences against a model of the two tiers --------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(st.integers(0, 3), min_size=1, max_size=7)),
        st.tuples(st.just("hit"), st.lists(st.integers(0, 3), min_size=1, max_size=7)),
        st.tuples(st.just("lock"), st.lists(st.integers(0, 3), min_size=1, max_size=7)),
        st.tuples(st.just("unlock"), st.integers(0, 5)),
        st.tuples(st.just("evict"), st.integers(1, 6)),
        st.tuples(st.just("evict_host"), st.integers(1, 6)),
    ),
    max_size=25,
)


@settings(max_examples=80, deadline=None)
@given(ops, st.integers(1, 2), st.sampled_from([4, 12, 400]))
def test_random_operations_keep_both_tiers_consistent(operations, page_size, num_host_pages):
    """The model: every prefix ever stored, with the K/V it was stored with. The tree must only
    return stored prefixes, with exactly their K/V, from either tier; with a host tier that
    never has to drop anything, it returns the longest stored prefix; locked paths stay on
    the device; the size counters and both pools' pages always agree with the tree."""
    cache, pool, host = make_cache(16, num_host_pages, page_size)
    lossless = num_host_pages == 400  # more than every token the operations can store
    stored: list[list[int]] = []
    locks = []
    for op, arg in operations:
        if op == "put":
            key = arg[: len(arg) - len(arg) % page_size]
            if len(key) // page_size > pool.num_free_pages + cache.evictable_size // page_size:
                continue  # the device cannot hold it now (locked pages)
            put(cache, pool, key)
            stored.append(key)
        elif op in ("hit", "lock"):
            match = cache.match_prefix(arg)
            total = match.num_tokens + match.num_host_tokens
            assert any(s[:total] == arg[:total] for s in stored) or total == 0
            if lossless:
                assert total == longest_stored_prefix(stored, arg, page_size)
            if cache.load_back(match):
                check_kv(pool, match.pages, arg[: match.num_tokens])
            if op == "lock":
                cache.inc_lock_ref(match.last_node)
                locks.append(match.last_node)
        elif op == "unlock" and locks:
            cache.dec_lock_ref(locks.pop(arg % len(locks)))
        elif op == "evict":
            cache.evict(arg)
        elif op == "evict_host":
            lossless = False
            cache.evict_host(arg)
        check_invariants(cache, pool, host, locks)
    for node in locks:
        cache.dec_lock_ref(node)
    cache.evict(10**6)
    cache.evict_host(10**6)
    assert (cache.total_size, cache.host_size, cache.root.children) == (0, 0, {})
    assert pool.num_free_pages == pool.num_pages and host.num_free_pages == host.num_pages


def longest_stored_prefix(stored, query, page_size):
    best = 0
    for s in stored:
        n = 0
        while n < min(len(s), len(query)) and s[n] == query[n]:
            n += 1
        best = max(best, n - n % page_size)
    return best


def check_invariants(cache, pool, host, locks):
    device_tokens = host_tokens = 0
    refs = [0] * pool.num_pages
    stack = [cache.root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            assert child.parent is node
            assert child.value is not None or child.host_value is not None  # in some tier
            if child.value is not None:
                assert node is cache.root or node.value is not None  # device part on top
                device_tokens += len(child.key)
                for p in child.value:
                    refs[p] += 1
            if child.host_value is not None:
                host_tokens += len(child.host_value) * cache.page_size
            stack.append(child)
    assert cache.total_size == device_tokens and cache.host_size == host_tokens
    assert host.num_used_pages * cache.page_size == host_tokens
    assert [pool.ref_count(p) for p in range(pool.num_pages)] == refs
    for node in locks:
        while node is not cache.root:
            assert node.value is not None and node.lock_ref > 0
            node = node.parent


# ---- the scheduler and the engine -----------------------------------------------------------


def test_scheduler_loads_prefixes_back_instead_of_recomputing_them():
    # 3 long instructions over 4 rows, interleaved, each call a separate "query"; the device
    # pool holds about one instruction
    def make(host_pages):
        config = EngineConfig(device="cpu", page_size=4, max_num_batched_tokens=256)
        shape = KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4)
        pool = KVPool(shape, 24)
        copier = KVCopier(pool, HostKVPool(shape, host_pages)) if host_pages else None
        from llmudf.engine.scheduler import Scheduler

        return Scheduler(config, pool, copier)

    instructions = [[10 + i] * 40 for i in range(3)]
    results = {}
    for host_pages in (0, 64):
        sched = make(host_pages)
        out, computed = {}, 0
        for row in range(4):
            for i, instruction in enumerate(instructions):
                sched.add(seq(f"{row}-{i}", instruction + [row + 1, 2, 3], max_tokens=2))
                out |= run(sched)
                computed += sched.take_counters().num_computed_prompt_tokens
        results[host_pages] = (out, computed)
        if host_pages:
            assert sched.cache.num_loaded_tokens > 0
    (out_off, computed_off), (out_on, computed_on) = results[0], results[64]
    assert (
        out_on
        == out_off
        == {
            f"{r}-{i}": expected(ins + [r + 1, 2, 3], 2)
            for r in range(4)
            for i, ins in enumerate(instructions)
        }
    )
    assert computed_on * 3 < computed_off


def test_greedy_answers_are_the_same_with_the_host_tier_on_or_off(tiny):
    # a pool of 300 token slots for 12 prompts of ~180 tokens: constant eviction and preemption
    ref = make_engine(tiny, num_kv_pages=75, page_size=4, host_kv_cache_bytes=0)
    on = make_engine(tiny, num_kv_pages=75, page_size=4)
    for engine in (ref, on):
        engine.generate(prompts(), GREEDY8)  # the second call finds prefixes evicted
    second_off = ref.generate(prompts()[::-1], GREEDY8)
    second_on = on.generate(prompts()[::-1], GREEDY8)
    assert_same(second_on, second_off)
    assert len({o.text for o in second_off}) >= 3  # equal answers that also vary
    stats = on.stats
    assert stats.num_host_hit_tokens > 0 and stats.num_bytes_to_device > 0
    assert stats.num_computed_prompt_tokens < ref.stats.num_computed_prompt_tokens
    assert ref.stats.num_host_hit_tokens == 0
    assert stats.num_cached_tokens <= stats.num_device_hit_tokens + stats.num_host_hit_tokens


@pytest.mark.slow
def test_default_model_answers_do_not_depend_on_the_tiers():
    """SmolLM2 greedy answers: prefixes loaded back from the host, and decode attention on
    the CPU, give the same text as a plain engine without any cache."""
    from llmudf.calls.prompt import ChatPrompt, render_user_message
    from llmudf.engine.engine import Engine
    from llmudf.engine.weights import load_model

    model, _, tokenizer = load_model(None)
    rows = [("Up", 2009, "Animation"), ("Heat", 1995, "Crime")]
    chats = [
        ChatPrompt(render_user_message(q, [("title", t), ("year", y), ("genre", g)])).messages()
        for q in ("Is this movie for kids? Answer yes or no.", "Name its director.")
        for t, y, g in rows
    ]
    params = SamplingParams(max_tokens=6)

    def engine(**cfg):
        return Engine(EngineConfig(page_size=1, **cfg), model=model, tokenizer=tokenizer)

    plain = engine(kv_cache_bytes=2**28, enable_prefix_cache=False, max_num_seqs=1)
    expected_texts = [o.text for o in plain.generate(chats, params)]
    num_tokens = max(len(tokenizer.encode_chat(c)) for c in chats)
    for cfg in ({}, {"cpu_attention_offload": True}):
        tiered = engine(num_kv_pages=num_tokens * 3 // 2, **cfg)  # ~1.5 prompts fit
        assert [o.text for o in tiered.generate(chats, params)] == expected_texts
        again = tiered.generate(chats[::-1], params)[::-1]  # evicted prefixes come back
        assert [o.text for o in again] == expected_texts
        stats = tiered.stats
        assert stats.num_host_hit_tokens > 0
        if cfg:
            assert stats.num_cpu_attention_tokens > 0
