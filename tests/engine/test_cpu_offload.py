"""NEO-style CPU decode attention: the kernel against the paged reference, the scheduler's
offload rule, and the same greedy answers whether a request's decode attention ran on the
device or on the CPU."""

import pytest
import torch
from test_engine import GREEDY8, assert_same, make_engine, prompts
from test_scheduler import expected, run, seq

from llmudf.engine.config import EngineConfig
from llmudf.engine.host_kv import HostKVPool, KVCopier
from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.scheduler import Scheduler
from llmudf.kernels import AttentionMetadata, paged_attention
from llmudf.kernels.cpu_attention import cpu_decode_attention, store_decode_kv


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "page_size"), [(4, 2, 4), (2, 2, 1)])
def test_cpu_decode_attention_matches_the_paged_reference(num_heads, num_kv_heads, page_size):
    torch.manual_seed(0)
    head_dim, num_pages = 8, 16
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim)
    seq_lens = [5, 1, 3 * page_size]
    free = torch.randperm(num_pages).tolist()  # each sequence's pages, scattered
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in seq_lens]
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    k_new = torch.randn(len(seq_lens), num_kv_heads, head_dim)
    v_new = torch.randn(len(seq_lens), num_kv_heads, head_dim)
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, page_size)
    store_decode_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    ref = paged_attention(q, k_cache, v_cache, meta, 0.3)
    width = max(map(len, tables))
    padded = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    out = cpu_decode_attention(q, k_cache, v_cache, padded, torch.tensor(seq_lens), 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.dtype == q.dtype
    half = cpu_decode_attention(
        q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), padded, torch.tensor(seq_lens), 0.3
    )
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=3e-2, rtol=3e-2)


def make_scheduler(num_pages, offload=True, host_pages=256, **cfg):
    config = EngineConfig(device="cpu", page_size=4, cpu_attention_offload=offload, **cfg)
    shape = KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4)
    pool = KVPool(shape, num_pages)
    return Scheduler(config, pool, KVCopier(pool, HostKVPool(shape, host_pages)))


def test_decoding_requests_move_to_the_host_instead_of_being_preempted():
    # 12 pages of 4 tokens; 10 requests of 14 tokens + 6 generated need 50 pages at once
    reqs = {f"r{i}": [i + 1] * 3 + list(range(20, 31)) for i in range(10)}
    results = {}
    for offload in (False, True):
        sched = make_scheduler(12, offload, max_num_batched_tokens=64)
        host_counts = []
        for i, (rid, toks) in enumerate(reqs.items()):
            sched.add(seq(rid, toks, max_tokens=6, arrival=i))
        out = run(sched, lambda b, counts=host_counts: counts.append(b.num_host_seqs))
        assert out == {rid: expected(t, 6) for rid, t in reqs.items()}
        results[offload] = (sched.num_preemptions, max(host_counts), sched.take_counters())
        assert sched.host.num_free_pages + sched.cache.host_size // 4 == sched.host.num_pages
    (preempt_off, host_off, _), (preempt_on, host_on, counters) = results[False], results[True]
    assert host_off == 0 and host_on > 0
    assert preempt_on < preempt_off
    assert counters.num_offloaded_requests > 0 and counters.num_cpu_attention_tokens > 0


def test_a_host_request_is_preempted_when_the_host_is_full_too():
    sched = make_scheduler(8, host_pages=3, max_num_batched_tokens=64)
    reqs = {f"r{i}": [i + 1] * 6 for i in range(4)}
    for i, (rid, toks) in enumerate(reqs.items()):
        sched.add(seq(rid, toks, max_tokens=8, arrival=i))
    assert run(sched) == {rid: expected(t, 8) for rid, t in reqs.items()}
    assert sched.num_preemptions > 0
    assert sched.host.num_free_pages + sched.cache.host_size // 4 == sched.host.num_pages


@pytest.fixture(scope="module")
def reference(tiny):
    return make_engine(tiny, enable_prefix_cache=False, max_num_seqs=1).generate(prompts(), GREEDY8)


def test_greedy_answers_are_the_same_when_decode_attention_runs_on_the_cpu(tiny, reference):
    # 300 token slots for 12 prompts of ~180 tokens + 8 generated each
    engine = make_engine(tiny, num_kv_pages=75, page_size=4, cpu_attention_offload=True)
    outs = engine.generate(prompts(), GREEDY8)
    assert_same(outs, reference)
    assert len({o.text for o in reference}) >= 3  # equal answers that also vary
    stats = engine.stats
    assert stats.num_offloaded_requests > 0 and stats.num_cpu_attention_tokens > 0
    again = engine.generate(prompts()[::-1], GREEDY8)
    assert_same(again[::-1], reference)
    assert engine.host_pool.num_free_pages * 4 + engine.scheduler.cache.host_size == (
        engine.host_pool.num_pages * 4
    )
