import pytest
import torch
import torch.nn.functional as F

from llmudf.kernels import AttentionMetadata, AttentionPlan, paged_attention, store_kv


def dense_reference(q, k, v, scale):
    """q: [q_len, Hq, D] for the last q_len positions of k, v: [L, Hkv, D]; plain causal SDPA
    with K/V heads repeated as HF does (query head h uses KV head h // group)."""
    q_len, num_heads, _ = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[length - q_len :, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def run_batch(
    query_lens, seq_lens, num_heads, num_kv_heads, page_size, head_dim=8, seed=0, plan=False
):
    """Store each sequence's cached prefix in one step, then attend with its new tokens in a
    mixed batch over randomly placed pages; compare with the dense reference. `plan`: build
    the step's AttentionPlan first and pass it, as the model runner does."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in seq_lens) + 3
    k_cache = torch.zeros(num_pages, page_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_pages, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in seq_lens]
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in seq_lens]
    for b, (q_len, k_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if k_len > q_len:  # the cached prefix, written by an earlier step
            prev = AttentionMetadata.build([k_len - q_len], [k_len - q_len], [tables[b]], page_size)
            store_kv(
                keys[b][: k_len - q_len],
                values[b][: k_len - q_len],
                k_cache,
                v_cache,
                prev.slot_mapping,
            )
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page_size)
    new_k = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens, strict=True)])
    new_v = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens, strict=True)])
    store_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    step_plan = None
    if plan:
        step_plan = AttentionPlan.build(meta, page_size, num_heads, num_kv_heads, q.dtype)
    out = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, step_plan)
    starts = meta.cu_seqlens_q.tolist()
    for b in range(len(seq_lens)):
        qb = q[starts[b] : starts[b + 1]]
        expected = dense_reference(qb, keys[b], values[b], head_dim**-0.5)
        torch.testing.assert_close(out[starts[b] : starts[b + 1]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_mixed_prefill_and_decode_match_dense_attention(num_heads, num_kv_heads, page_size):
    # fresh prefill, prefill chunk after a cached prefix, decodes of unequal lengths
    run_batch([7, 5, 1, 1, 1], [7, 12, 1, 9, 30], num_heads, num_kv_heads, page_size)


@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        ([3, 8, 2, 5, 1], [40, 44, 41, 50, 45]),  # padded into one call (plus the decode)
        ([2, 30], [100, 30]),  # padding would triple the work: one call per chunk
    ],
)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_short_prefill_chunks_after_cached_prefixes(query_lens, seq_lens, num_heads, num_kv_heads):
    run_batch(query_lens, seq_lens, num_heads, num_kv_heads, page_size=4)


def test_decode_only_batch_of_equal_lengths():
    run_batch([1, 1, 1], [10, 10, 10], 4, 2, 4)


def test_store_kv_writes_the_mapped_slots():
    k_cache = torch.zeros(3, 2, 1, 2)
    v_cache = torch.zeros(3, 2, 1, 2)
    k = torch.arange(6.0).view(3, 1, 2)
    store_kv(k, -k, k_cache, v_cache, torch.tensor([5, 0, 2]))
    assert k_cache[2, 1, 0].tolist() == [0.0, 1.0]
    assert k_cache[0, 0, 0].tolist() == [2.0, 3.0]
    assert k_cache[1, 0, 0].tolist() == [4.0, 5.0]
    assert v_cache[1, 0, 0].tolist() == [-4.0, -5.0]
    assert k_cache[0, 1].abs().sum() == 0


def test_metadata_build_computes_slots_and_offsets():
    meta = AttentionMetadata.build([2, 1], [5, 3], [[4, 1], [2]], page_size=4)
    assert meta.slot_mapping.tolist() == [4 * 4 + 3, 1 * 4 + 0, 2 * 4 + 2]
    assert meta.cu_seqlens_q.tolist() == [0, 2, 3]
    assert meta.block_tables.tolist() == [[4, 1], [2, 0]]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (2, 5)


@pytest.mark.parametrize(
    "query_lens,seq_lens,tables,match",
    [
        ([3], [2], [[0]], "query_len <= seq_len"),
        ([0], [2], [[0]], "query_len <= seq_len"),
        ([2], [9], [[0, 1]], "cannot hold 9 tokens"),
        ([1, 1], [1], [[0]], "one entry per sequence"),
    ],
)
def test_metadata_build_rejects_bad_input(query_lens, seq_lens, tables, match):
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.build(query_lens, seq_lens, tables, page_size=4)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 1)])
def test_a_plan_built_once_for_the_step_gives_the_same_attention(num_heads, num_kv_heads):
    # padded short prefill chunks, a long prefill, decodes: every part of the plan
    lens = ([7, 5, 3, 4, 1, 1, 40], [7, 12, 20, 20, 9, 30, 40])
    run_batch(*lens, num_heads, num_kv_heads, page_size=4, plan=True)


def test_a_plan_for_other_shapes_is_rejected():
    meta = AttentionMetadata.build([2, 1], [5, 3], [[4, 1], [2]], page_size=4)
    cache = torch.zeros(5, 4, 2, 8)
    q = torch.zeros(3, 4, 8)
    plan = AttentionPlan.build(meta, page_size=4, num_heads=4, num_kv_heads=2)
    assert paged_attention(q, cache, cache, meta, 1.0, plan).shape == q.shape
    for other in (
        AttentionPlan.build(meta, page_size=1, num_heads=4, num_kv_heads=2),
        AttentionPlan.build(meta, page_size=4, num_heads=2, num_kv_heads=2),
        AttentionPlan.build(meta, page_size=4, num_heads=4, num_kv_heads=2, dtype=torch.bfloat16),
    ):
        with pytest.raises(ValueError, match="the attention plan is for"):
            paged_attention(q, cache, cache, meta, 1.0, other)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    meta = AttentionMetadata.build([1], [1], [[0]], page_size=4)
    cache = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention(torch.zeros(1, 3, 8), cache, cache, meta, 1.0)
