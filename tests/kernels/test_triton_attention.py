"""The Triton paged attention against the torch reference, on CPU under the Triton
interpreter: ragged batches, GQA ratios 1/4/8 (and a padded 3), page and query-tile
boundaries, split-K, an empty cached prefix, decodes behind a long prefix; batch invariance
in deterministic mode; cascade (shared prefix) attention.

Tolerances: float32 within 1e-5 of the reference; bfloat16 within 2e-2 (probabilities are
rounded to bf16 before the P.V product, as on a GPU, and the interpreter truncates casts).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also set by tests/conftest.py

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")
if not triton.knobs.runtime.interpret:
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from llmudf.kernels import AttentionMetadata, paged_attention, store_kv  # noqa: E402
from llmudf.kernels.attention_triton import (  # noqa: E402
    TritonAttentionPlan,
    paged_attention_triton,
)

HEAD_DIM = 16
SMALL = dict(rows_per_tile=32, block_n=16)  # small key blocks, so that splits hold several
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


class Pool:
    """A paged KV cache with random pages handed out, and per-sequence K/V to store."""

    def __init__(self, num_pages, page_size, num_kv_heads, dtype, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        shape = (num_pages, page_size, num_kv_heads, HEAD_DIM)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.page_size = page_size
        self.free = torch.randperm(num_pages, generator=self.gen).tolist()

    def pages(self, num_tokens):
        return [self.free.pop() for _ in range(-(-num_tokens // self.page_size))]

    def store(self, keys, values, pages, start, end):
        """Write positions [start, end) of a sequence held in `pages`."""
        meta = AttentionMetadata.build([end - start], [end], [pages], self.page_size)
        store_kv(keys[start:end], values[start:end], self.k, self.v, meta.slot_mapping)


def random_kv(n, num_kv_heads, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    return k, torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)


def compare(query_lens, seq_lens, num_heads, num_kv_heads, page_size, dtype=torch.float32, **plan):
    pool = Pool(sum(-(-n // page_size) for n in seq_lens) + 2, page_size, num_kv_heads, dtype)
    tables = []
    for b, n in enumerate(seq_lens):
        tables.append(pool.pages(n))
        k, v = random_kv(n, num_kv_heads, dtype, seed=b)
        pool.store(k, v, tables[-1], 0, n)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page_size)
    q = torch.randn(sum(query_lens), num_heads, HEAD_DIM, generator=pool.gen).to(dtype)
    expected = paged_attention(q.float(), pool.k.float(), pool.v.float(), meta, HEAD_DIM**-0.5)
    step = TritonAttentionPlan.build(meta, page_size, num_heads, num_kv_heads, dtype, **plan)
    out = paged_attention_triton(q, pool.k, pool.v, meta, HEAD_DIM**-0.5, step)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])
    return step


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, page_size",
    [(4, 4, 1), (8, 2, 4), (8, 1, 16), (6, 2, 16)],
    ids=["gqa1-page1", "gqa4-page4", "gqa8-page16", "gqa3-page16"],
)
def test_ragged_step_matches_reference(num_heads, num_kv_heads, page_size):
    # a whole prompt (empty prefix), a chunk after a cached prefix that crosses pages and
    # query tiles, two decodes (one behind a long prefix), a one-token prompt
    step = compare(
        [19, 13, 1, 1, 1],
        [19, 40, 70, 5, 1],
        num_heads,
        num_kv_heads,
        page_size,
        split_size=32,
        **SMALL,
    )
    assert step.max_splits == 3  # the 70-token decode was split (flash-decoding)


def test_bfloat16():
    compare([9, 1, 1], [9, 50, 17], 8, 2, 16, torch.bfloat16, split_size=32, **SMALL)


def test_one_split_and_a_step_sized_split():
    compare([17, 1], [33, 48], 4, 2, 4, split_size=1024, **SMALL)
    step = compare([1, 1], [100, 3], 4, 2, 4, split_size=None, **SMALL)
    assert step.max_splits > 1  # two sequences are too few programs for a GPU: split


def test_rejects_a_plan_for_another_shape():
    pool = Pool(4, 4, 2, torch.float32)
    meta = AttentionMetadata.build([2], [2], [pool.pages(2)], 4)
    step = TritonAttentionPlan.build(meta, 4, 4, 2, torch.float32, **SMALL)
    with pytest.raises(ValueError, match="attention plan is for page size 4"):
        paged_attention_triton(torch.zeros(2, 8, HEAD_DIM), pool.k, pool.v, meta, 1.0, step)


def test_batch_invariance_alone_in_a_batch_and_from_cache():
    """A request's outputs are bitwise the same alone, among 7 others, and with its prefix
    served from the cache (deterministic mode: a fixed split size)."""
    num_heads, num_kv_heads, page_size, length = 4, 1, 4, 46
    plan = dict(split_size=32, **SMALL)
    k, v = random_kv(length, num_kv_heads, torch.float32, seed=100)
    q = torch.randn(length, num_heads, HEAD_DIM, generator=torch.Generator().manual_seed(7))

    def attend(query_lens, seq_lens, others_first: bool):
        """Our request (cached up to seq_len - q_len) with 7 others, or alone."""
        pool = Pool(100, page_size, num_kv_heads, torch.float32, seed=len(query_lens))
        tables, queries = [], []
        ours = 0 if not others_first else len(query_lens) - 1
        for b, (q_len, n) in enumerate(zip(query_lens, seq_lens, strict=True)):
            tables.append(pool.pages(n))
            if b == ours:
                kb, vb, qb = k[:n], v[:n], q[n - q_len : n]
            else:
                kb, vb = random_kv(n, num_kv_heads, torch.float32, seed=b)
                qb = torch.randn(q_len, num_heads, HEAD_DIM, generator=pool.gen)
            pool.store(kb, vb, tables[-1], 0, n)
            queries.append(qb)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, page_size)
        step = TritonAttentionPlan.build(meta, page_size, num_heads, num_kv_heads, **plan)
        out = paged_attention_triton(torch.cat(queries), pool.k, pool.v, meta, 0.25, step)
        start = meta.cu_seqlens_q[ours]
        return out[start : start + query_lens[ours]]

    alone = attend([length], [length], False)
    others_q, others_k = [1, 20, 1, 5, 1, 9, 1], [9, 20, 70, 20, 3, 40, 33]
    in_batch = attend(others_q + [length], others_k + [length], True)
    assert torch.equal(in_batch, alone)
    # the first 29 tokens came from the cache: the last 17 are a chunk of their own
    from_cache = attend([17] + others_q, [length] + others_k, False)
    assert torch.equal(from_cache, alone[-17:])
    # all but the last from the cache: the last token decodes
    decoded = attend([1], [length], False)
    assert torch.equal(decoded, alone[-1:])


def test_cascade_equals_plain_attention():
    """Decodes behind one shared prefix (the same pages) attend to it once per group; the
    merged result equals plain attention."""
    num_heads, num_kv_heads, page_size, shared = 8, 2, 4, 48
    pool = Pool(80, page_size, num_kv_heads, torch.float32)
    prefix_pages = pool.pages(shared)
    pk, pv = random_kv(shared, num_kv_heads, torch.float32, seed=50)
    pool.store(pk, pv, prefix_pages, 0, shared)
    tables, seq_lens = [], []
    for b, own in enumerate([1, 6, 13, 3, 9]):  # five decodes behind the prefix
        n = shared + own
        tables.append(prefix_pages + pool.pages(own))
        k, v = random_kv(n, num_kv_heads, torch.float32, seed=b)
        pool.store(k, v, tables[-1], shared, n)
        seq_lens.append(n)
    # not grouped: a prefill chunk and a decode on pages of their own
    for b, n in enumerate([20, 70]):
        tables.append(pool.pages(n))
        k, v = random_kv(n, num_kv_heads, torch.float32, seed=10 + b)
        pool.store(k, v, tables[-1], 0, n)
        seq_lens.append(n)
    query_lens = [1] * 5 + [20, 1]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page_size)
    q = torch.randn(sum(query_lens), num_heads, HEAD_DIM, generator=pool.gen)
    plain_plan = TritonAttentionPlan.build(meta, page_size, num_heads, num_kv_heads, **SMALL)
    cascade_plan = TritonAttentionPlan.build(
        meta, page_size, num_heads, num_kv_heads, cascade=True, min_cascade_prefix=32, **SMALL
    )
    assert cascade_plan.cascade is not None
    assert cascade_plan.cascade.prefix_lens.tolist() == [shared]
    assert cascade_plan.cascade.rows.tolist() == [0, 1, 2, 3, 4]
    plain = paged_attention_triton(q, pool.k, pool.v, meta, 0.25, plain_plan)
    merged = paged_attention_triton(q, pool.k, pool.v, meta, 0.25, cascade_plan)
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
    expected = paged_attention(q, pool.k, pool.v, meta, 0.25)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
