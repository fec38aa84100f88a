"""Paged attention in Triton: one kernel for a flat step of prefill chunks and decodes.

Same contract as `paged_attention` in `attention.py` (varlen queries, GQA, any page size,
causal within the chunk). The query heads of one KV head are folded into the rows of a tile
(`BLOCK_M` tokens x `GROUP_PAD` heads), so K/V are read once per KV head. Split-K
(flash-decoding): each sequence's keys are cut at fixed positions, every `split_size` tokens;
one program per (sequence, query tile, KV head, split) writes a partial output and its
log-sum-exp, and a second kernel merges the splits in order.

Batch invariance: a row's result depends only on its own query, its sequence's K/V and the
split size. Key blocks start at the split's own start, so their alignment does not move when
part of the sequence came from the cache, and blocks past a row's position are fully masked
(an exact no-op on the running sum). Splits are merged sequentially, never by a tree whose
shape depends on the batch. Deterministic mode fixes `split_size`; otherwise it is chosen per
step to fill the GPU, and decodes behind a long shared prefix run as a cascade: the prefix
once per group of requests, each suffix on its own, merged by log-sum-exp (`_merge_prefix`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from llmudf.kernels.attention import AttentionMetadata

# Under the interpreter tl.dot is numpy's BLAS matmul, which gets bf16 wrong (3.9.0) and rounds
# a row differently depending on its place in the tile (a GPU's MMA does not): there, dots are
# float32 products summed along K, each element on its own.
_UPCAST_DOTS = bool(knobs.runtime.interpret)


# ints that change from step to step are not specialized on (no recompiles mid-run)
@triton.jit(do_not_specialize=["max_splits", "split_size"])
def _attention_kernel(
    Q, K, V, Out, Lse, PartO, PartLse,
    cu_seqlens_q, seq_lens, kv_starts, block_tables,
    scale_log2, num_heads, max_splits, split_size,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
    WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # Lse: [T, Hq] fp32; PartO: [T, Hq, max_splits, HEAD_DIM] fp32; PartLse: [T, Hq, max_splits]
    b = tl.program_id(0)
    m_block = tl.program_id(1)
    kv_head = tl.program_id(2) // max_splits
    split = tl.program_id(2) % max_splits
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    num_splits = tl.cdiv(seq_len, split_size)
    if (m_block * BLOCK_M >= q_len) | (split >= num_splits):
        return
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(kv_starts + b)
    # rows: BLOCK_M tokens x GROUP_PAD query heads of this KV head
    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = m_block * BLOCK_M + r // GROUP_PAD
    head = kv_head * GROUP + r % GROUP_PAD
    row_ok = (tok < q_len) & (r % GROUP_PAD < GROUP)
    pos = seq_len - q_len + tok  # each row's position in its sequence
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows = (q_start + tok).to(tl.int64)
    q_off = rows * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    split_lo = split * split_size
    hi = tl.minimum(split_lo + split_size, seq_len)
    if CAUSAL:  # the tile's last position bounds its keys
        hi = tl.minimum(hi, seq_len - q_len + tl.minimum((m_block + 1) * BLOCK_M, q_len))
    lo = split_lo + tl.maximum(kv_lo - split_lo, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(block_tables + b * stride_bt + n // PAGE_SIZE, mask=n_ok, other=0)
        slots = (page.to(tl.int64) * PAGE_SIZE + n % PAGE_SIZE) * stride_ks + kv_head * stride_kh
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + slots[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        # dots written out, not a helper: the interpreter pays ~5 ms per nested jit call
        if UPCAST:
            s = tl.sum(q.to(tl.float32)[:, :, None] * tl.trans(k).to(tl.float32)[None, :, :], 1)
        elif IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # [R, N], log2 units
        allowed = n_ok[None, :] & (n[None, :] >= kv_lo)
        if CAUSAL:
            allowed = allowed & (n[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            pv = tl.sum(p.to(v.dtype).to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        elif IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    mask = row_ok[:, None] & d_ok[None, :]
    if num_splits == 1:
        o_off = rows * stride_ot + head * stride_oh
        tl.store(Out + o_off[:, None] + d[None, :], out.to(Out.dtype.element_ty), mask=mask)
        if WRITE_LSE:
            tl.store(Lse + rows * num_heads + head, lse, mask=row_ok)
    else:
        part = (rows * num_heads + head) * max_splits + split
        tl.store(PartO + part[:, None] * HEAD_DIM + d[None, :], out, mask=mask)
        tl.store(PartLse + part, lse, mask=row_ok)


@triton.jit(do_not_specialize=["max_splits"])
def _combine_kernel(
    Out, Lse, PartO, PartLse, token_splits,
    num_heads, max_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    num_splits = tl.load(token_splits + t)
    if num_splits <= 1:
        return  # written by the attention kernel
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (t.to(tl.int64) * num_heads + h) * max_splits
    # in split order, one at a time: the same order whatever else is in the batch
    m = tl.full([], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([], tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(PartLse + part + s)
        o = tl.load(PartO + (part + s) * HEAD_DIM + d, mask=d_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        acc = acc * a + o * w
        total = total * a + w
        m = m_new
    out = acc / total
    o_off = t.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(Out + o_off + d, out.to(Out.dtype.element_ty), mask=d_ok)
    if WRITE_LSE:
        tl.store(Lse + t.to(tl.int64) * num_heads + h, m + tl.math.log2(total))


# -- host side ---------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
# a step with fewer (sequence, query tile, KV head) programs than this splits its keys
_TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs
_MIN_CASCADE_GROUP = 4


@dataclass(frozen=True)
class _Cascade:
    """Decodes that share a long prefix (the same KV pages, handed out by the radix tree)."""

    rows: torch.Tensor  # [R] int64 flat-batch rows of the grouped decodes, group by group
    cu_seqlens_q: torch.Tensor  # [G+1] int32 offsets of each group's rows in `rows`
    prefix_lens: torch.Tensor  # [G] int32 shared tokens of each group
    prefix_tables: torch.Tensor  # [G, max_prefix_pages] int32
    kv_starts: torch.Tensor  # [B] int32 where each sequence's own keys start (0 if ungrouped)
    max_group: int


@dataclass(frozen=True)
class TritonAttentionPlan:
    """Launch parameters of one step, shared by all layers (the Triton `AttentionPlan`).

    `split_size`: keys per split; fixed in deterministic mode so a row's reduction order
    depends only on its own sequence. `rows_per_tile` x `block_n`: the tile shape, fixed per
    model for the same reason.
    """

    page_size: int
    num_heads: int
    num_kv_heads: int
    dtype: torch.dtype
    split_size: int
    max_splits: int
    num_q_blocks: int
    block_m: int
    block_n: int
    token_splits: torch.Tensor  # [T] int32 splits of each token's sequence
    cascade: _Cascade | None

    @classmethod
    def build(
        cls,
        meta: AttentionMetadata,
        page_size: int,
        num_heads: int,
        num_kv_heads: int,
        dtype: torch.dtype = torch.float32,
        *,
        split_size: int | None = 1024,
        cascade: bool = False,
        rows_per_tile: int = 64,
        block_n: int = 64,
        max_seq_len: int | None = None,
        min_cascade_prefix: int = 256,
    ) -> TritonAttentionPlan:
        """`split_size` None: chosen for this step (not batch-invariant). `cascade`: group
        decodes behind a shared prefix (reads the block tables on the host). `max_seq_len`:
        size the grid for sequences up to this long instead of this step's longest, so the
        launch shape stays fixed (CUDA graphs); no host sync then. `min_cascade_prefix`: the
        fewest shared tokens for which a group of decodes runs as a cascade."""
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
            )
        group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
        block_m = max(rows_per_tile // group_pad, 1)
        num_q_blocks = triton.cdiv(meta.max_seqlen_q, block_m)
        longest = max_seq_len or meta.max_seqlen_k
        if split_size is None:
            num_seqs = meta.seq_lens.shape[0]
            programs = num_seqs * num_q_blocks * num_kv_heads
            want = max(1, -(-_TARGET_PROGRAMS // programs))
            split_size = triton.cdiv(triton.cdiv(longest, want), block_n) * block_n
            split_size = max(split_size, 4 * block_n)
        if split_size % block_n:
            raise ValueError(f"split_size {split_size} is not a multiple of {block_n}")
        cu = meta.cu_seqlens_q
        splits = (meta.seq_lens + split_size - 1) // split_size
        token_splits = torch.repeat_interleave(
            splits, cu[1:] - cu[:-1], output_size=meta.slot_mapping.shape[0]
        ).to(torch.int32)
        groups = _cascade(meta, page_size, min_cascade_prefix) if cascade else None
        return cls(
            page_size,
            num_heads,
            num_kv_heads,
            dtype,
            split_size,
            triton.cdiv(longest, split_size),
            num_q_blocks,
            block_m,
            block_n,
            token_splits,
            groups,
        )


def _cascade(meta: AttentionMetadata, page_size: int, min_prefix: int) -> _Cascade | None:
    """Group the decodes whose block tables start with the same pages."""
    q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    seq_lens = meta.seq_lens.tolist()
    tables = meta.block_tables.tolist()
    by_first: dict[int, list[int]] = {}
    for b, (q_len, k_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        if q_len == 1 and k_len > min_prefix:
            by_first.setdefault(tables[b][0], []).append(b)
    rows, cu, prefix_lens, prefix_tables = [], [0], [], []
    kv_starts = [0] * len(seq_lens)
    cu_rows = meta.cu_seqlens_q.tolist()
    for members in by_first.values():
        if len(members) < _MIN_CASCADE_GROUP:
            continue
        # shared pages, leaving each member at least its last token's page
        limit = min((seq_lens[b] - 1) // page_size for b in members)
        num_shared = 0
        while num_shared < limit and len({tables[b][num_shared] for b in members}) == 1:
            num_shared += 1
        if num_shared * page_size < min_prefix:
            continue
        rows += [cu_rows[b] for b in members]
        cu.append(len(rows))
        prefix_lens.append(num_shared * page_size)
        prefix_tables.append(tables[members[0]][:num_shared])
        for b in members:
            kv_starts[b] = num_shared * page_size
    if not prefix_lens:
        return None
    width = max(len(t) for t in prefix_tables)
    device = meta.block_tables.device
    as_int32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return _Cascade(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        cu_seqlens_q=as_int32(cu),
        prefix_lens=as_int32(prefix_lens),
        prefix_tables=as_int32([t + [0] * (width - len(t)) for t in prefix_tables]),
        kv_starts=as_int32(kv_starts),
        max_group=max(cu[i + 1] - cu[i] for i in range(len(prefix_lens))),
    )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    plan: TritonAttentionPlan | None = None,
) -> torch.Tensor:
    """`paged_attention` in Triton: q [T, Hq, D] -> [T, Hq, D]. `plan` None: built here with
    the default (deterministic) split size."""
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = TritonAttentionPlan.build(meta, page_size, num_heads, num_kv_heads, q.dtype)
    elif (plan.page_size, plan.num_heads, plan.num_kv_heads, plan.dtype) != (
        page_size,
        num_heads,
        num_kv_heads,
        q.dtype,
    ):
        raise ValueError(
            f"the attention plan is for page size {plan.page_size}, {plan.num_heads}/"
            f"{plan.num_kv_heads} heads and {plan.dtype}; this call has {page_size}, "
            f"{num_heads}/{num_kv_heads} and {q.dtype}"
        )
    out = torch.zeros_like(q)  # rows of padding (CUDA-graph buckets) are never written
    cascade = plan.cascade
    lse = None if cascade is None else torch.empty(num_tokens, num_heads, device=q.device)
    _launch(
        plan, q, k_cache, v_cache, out, lse, meta.cu_seqlens_q, meta.seq_lens,
        None if cascade is None else cascade.kv_starts, meta.block_tables, scale,
        num_q_blocks=plan.num_q_blocks, max_splits=plan.max_splits,
        split_size=plan.split_size, token_splits=plan.token_splits, causal=True,
    )  # fmt: skip
    if cascade is not None:
        _merge_prefix(plan, cascade, q, k_cache, v_cache, out, lse, scale)
    return out


def _merge_prefix(plan, cascade: _Cascade, q, k_cache, v_cache, out, lse, scale) -> None:
    """Attend the grouped decodes to their shared prefix once per group, then merge with
    their own suffix's result by log-sum-exp."""
    rows = cascade.rows
    q_rows = q.index_select(0, rows)
    pre_out = torch.empty_like(q_rows)
    pre_lse = torch.empty(q_rows.shape[:2], device=q.device)
    longest = int(cascade.prefix_lens.max())
    ones = torch.ones(rows.shape[0], dtype=torch.int32, device=q.device)
    _launch(
        plan, q_rows, k_cache, v_cache, pre_out, pre_lse, cascade.cu_seqlens_q,
        cascade.prefix_lens, None, cascade.prefix_tables, scale,
        num_q_blocks=triton.cdiv(cascade.max_group, plan.block_m), max_splits=1,
        split_size=triton.cdiv(longest, plan.block_n) * plan.block_n, token_splits=ones,
        causal=False,
    )  # fmt: skip
    suf_lse = lse.index_select(0, rows)
    m = torch.maximum(suf_lse, pre_lse)
    w_suf = torch.exp2(suf_lse - m)[..., None]
    w_pre = torch.exp2(pre_lse - m)[..., None]
    suf = out.index_select(0, rows).float()
    merged = (suf * w_suf + pre_out.float() * w_pre) / (w_suf + w_pre)
    out.index_copy_(0, rows, merged.to(out.dtype))


def _launch(
    plan, q, k_cache, v_cache, out, lse, cu_seqlens_q, seq_lens, kv_starts, block_tables,
    scale, *, num_q_blocks, max_splits, split_size, token_splits, causal,
):  # fmt: skip
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_o = part_lse = out  # unused when every sequence has one split
    if max_splits > 1:
        part_o = torch.empty(num_tokens, num_heads, max_splits, head_dim, device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, max_splits, device=q.device)
    num_seqs = seq_lens.shape[0]
    grid = (num_seqs, num_q_blocks, num_kv_heads * max_splits)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, out if lse is None else lse, part_o, part_lse,
        cu_seqlens_q, seq_lens, seq_lens if kv_starts is None else kv_starts, block_tables,
        scale * LOG2E, num_heads, max_splits, split_size,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1],
        CAUSAL=causal, HAS_KV_START=kv_starts is not None, WRITE_LSE=lse is not None,
        UPCAST=_UPCAST_DOTS, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    if max_splits > 1:
        _combine_kernel[(num_tokens, num_heads)](
            out, out if lse is None else lse, part_o, part_lse, token_splits,
            num_heads, max_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, WRITE_LSE=lse is not None,
        )  # fmt: skip
