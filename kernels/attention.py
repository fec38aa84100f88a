"""Paged attention: the torch reference (gather pages + scaled dot-product attention).

Per layer the KV cache is `k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]`.
One forward runs a flat batch of T new tokens from B sequences (prefill chunks and decodes
mixed), described by `AttentionMetadata`. New token i of sequence b sits at position
`seq_lens[b] - q_len_b + i` and attends causally to every position <= its own.

The torch reference gathers K/V pages and builds masks from index tensors that depend only
on the step's metadata, not on the layer: the caller builds them once per step as an
`AttentionPlan` and passes it to every layer's `paged_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where the new tokens of one forward pass come from and where their K/V live.

    cu_seqlens_q: [B+1] int32, offsets of each sequence's new tokens in the flat batch
    seq_lens: [B] int32, context length of each sequence after this step (cached + new)
    block_tables: [B, max_pages] int32, KV page ids of each sequence, padded with 0
    slot_mapping: [T] int64, flat slot (`page * page_size + offset`) of each new token's K/V

    >>> meta = AttentionMetadata.build([3, 1], [3, 5], [[0], [1, 2]], page_size=4)
    >>> meta.slot_mapping.tolist()
    [0, 1, 2, 8]
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from plain lists: new tokens and context length per sequence, page ids."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError(
                "query_lens, seq_lens and block_tables must have one entry per sequence"
            )
        slots: list[int] = []
        for q_len, k_len, pages in zip(query_lens, seq_lens, block_tables, strict=True):
            if not 0 < q_len <= k_len:
                raise ValueError(f"need 0 < query_len <= seq_len, got {q_len} and {k_len}")
            if len(pages) * page_size < k_len:
                raise ValueError(f"{len(pages)} pages of {page_size} cannot hold {k_len} tokens")
            slots += [
                pages[p // page_size] * page_size + p % page_size
                for p in range(k_len - q_len, k_len)
            ]
        max_pages = max(len(p) for p in block_tables)
        table = [p + [0] * (max_pages - len(p)) for p in block_tables]
        cu = [0]
        for q_len in query_lens:
            cu.append(cu[-1] + q_len)
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(table, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
        )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the new tokens' K/V ([T, Hkv, D]) into their slots of the paged cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@dataclass
class _Prefill:
    q_start: int
    q_len: int
    k_start: int  # first row of this sequence's K/V in the step's prefill gather
    k_len: int
    mask: torch.Tensor | None  # [G*q_len, k_len] additive (0 / -inf); None: plain causal, G == 1


@dataclass
class _Padded:
    """Sequences attended in one SDPA call, their new tokens padded to `q_len` and their K/V
    to `num_pages` pages: the decodes of a step, or its short prefill chunks (the new rows of
    many prompts after a shared cached prefix), which one call per chunk would spend more on
    call overhead than on attention."""

    q_len: int
    rows: torch.Tensor  # [B * q_len] flat-batch row of each padded query (padding: row 0)
    real: torch.Tensor  # [n] positions in `rows` that are real tokens
    real_rows: torch.Tensor  # [n] their flat-batch rows: rows[real]
    pages: torch.Tensor  # [B * num_pages] int64 page ids, padding pages masked
    mask: torch.Tensor  # [B, 1, G * q_len, num_pages * page_size] additive


@dataclass(frozen=True)
class AttentionPlan:
    """Index tensors shared by all layers of one step, built once from its metadata. K/V are
    gathered with `index_select` over whole pages (several times faster than advanced
    indexing); masks are additive, so SDPA does not convert a bool mask in every layer.

    >>> meta = AttentionMetadata.build([3, 1], [3, 5], [[0], [1, 2]], page_size=4)
    >>> plan = AttentionPlan.build(meta, page_size=4, num_heads=2, num_kv_heads=1)
    >>> len(plan.prefills), len(plan.padded)  # one prefill chunk, one batch of decodes
    (1, 1)
    """

    page_size: int
    group: int  # query heads per KV head
    dtype: torch.dtype  # of the queries, and so of the masks
    padded: list[_Padded]
    prefill_pages: torch.Tensor | None  # [sum of ceil(k_len / page_size)] int64 page ids
    prefills: list[_Prefill]

    @classmethod
    def build(
        cls,
        meta: AttentionMetadata,
        page_size: int,
        num_heads: int,
        num_kv_heads: int,
        dtype: torch.dtype = torch.float32,
    ) -> AttentionPlan:
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
            )
        group = num_heads // num_kv_heads
        padded, prefill_pages, prefills = _plan(meta, page_size, group, dtype)
        return cls(page_size, group, dtype, padded, prefill_pages, prefills)


# prefill chunks of at most this many tokens are padded into one call when the padding at
# most doubles the attention work
_SHORT_CHUNK = 32


def _plan(meta: AttentionMetadata, page_size: int, group: int, dtype: torch.dtype):
    cu = meta.cu_seqlens_q.tolist()
    seq_lens = meta.seq_lens.tolist()
    q_lens = [cu[b + 1] - cu[b] for b in range(len(seq_lens))]
    decodes = [b for b, q_len in enumerate(q_lens) if q_len == 1]
    short = [b for b, q_len in enumerate(q_lens) if 1 < q_len <= _SHORT_CHUNK]
    if len(short) < 2 or not _worth_padding(short, q_lens, seq_lens):
        short = []
    padded = [_padded(meta, batch, page_size, group, dtype) for batch in (decodes, short) if batch]
    in_padded = set(short)
    device = meta.block_tables.device
    tables = meta.block_tables.long()
    prefills, prefill_pages = [], []
    k_start = 0
    for b, k_len in enumerate(seq_lens):
        q_len = q_lens[b]
        if q_len == 1 or b in in_padded:
            continue
        mask = None
        if q_len != k_len or group > 1:
            # causal, shifted by the cached prefix; G stacked copies for the folded GQA rows
            q_pos = torch.arange(k_len - q_len, k_len, device=device)
            allowed = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
            mask = _additive(allowed, dtype).repeat(group, 1)
        num_pages = -(-k_len // page_size)
        prefill_pages.append(tables[b, :num_pages])
        prefills.append(_Prefill(cu[b], q_len, k_start, k_len, mask))
        k_start += num_pages * page_size
    prefill_pages = torch.cat(prefill_pages) if prefills else None
    return padded, prefill_pages, prefills


def _worth_padding(batch: list[int], q_lens: list[int], seq_lens: list[int]) -> bool:
    """Padded to one call, the chunks' attention work at most doubles."""
    work = sum(q_lens[b] * seq_lens[b] for b in batch)
    padded = len(batch) * max(q_lens[b] for b in batch) * max(seq_lens[b] for b in batch)
    return padded <= 2 * work


def _padded(meta, batch: list[int], page_size: int, group: int, dtype) -> _Padded:
    device = meta.block_tables.device
    index = torch.tensor(batch, device=device)
    starts = meta.cu_seqlens_q.long()[index]  # [B]
    q_lens = meta.cu_seqlens_q.long()[index + 1] - starts
    k_lens = meta.seq_lens.long()[index]
    q_len = int(q_lens.max())
    num_pages = -(-int(k_lens.max()) // page_size)
    offsets = torch.arange(q_len, device=device)[None, :]  # [1, q]
    is_real = offsets < q_lens[:, None]  # [B, q]
    rows = torch.where(is_real, starts[:, None] + offsets, 0).reshape(-1)
    # query i of sequence b sits at position k_len - q_len_b + i; padding queries see key 0
    # only, so that no row of the softmax is empty
    q_pos = (k_lens - q_lens)[:, None] + offsets  # [B, q]
    keys = torch.arange(num_pages * page_size, device=device)[None, None, :]  # [1, 1, L]
    allowed = (keys <= q_pos[:, :, None]) & is_real[:, :, None]
    allowed[:, :, 0] |= ~is_real
    mask = _additive(allowed, dtype).repeat(1, group, 1)[:, None]  # [B, 1, G*q, L]
    pages = meta.block_tables.long()[index, :num_pages].reshape(-1)
    real = is_real.reshape(-1).nonzero()[:, 0]
    return _Padded(q_len, rows, real, rows[real], pages, mask)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def _gather(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache [num_pages, page_size, Hkv, D], pages [N] -> [N * page_size, Hkv, D]"""
    num_pages, page_size, num_kv_heads, head_dim = cache.shape
    rows = cache.view(num_pages, -1).index_select(0, pages)
    return rows.view(-1, num_kv_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' paged K/V (torch reference).

    q: [T, Hq, D] (Hq a multiple of Hkv); the new tokens' K/V must already be stored with
    `store_kv`. Returns [T, Hq, D]. `plan`: the step's AttentionPlan, built once for all
    layers; None builds one for this call. Decodes run as one batched SDPA call, each prefill
    chunk as its own call; the query heads of one KV head are folded into the query length so
    GQA needs no K/V copies.
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = AttentionPlan.build(meta, page_size, num_heads, num_kv_heads, q.dtype)
    elif (plan.page_size, plan.group * num_kv_heads, plan.dtype) != (page_size, num_heads, q.dtype):
        raise ValueError(
            f"the attention plan is for page size {plan.page_size}, {plan.group} query heads "
            f"per KV head and {plan.dtype}; this call has {page_size}, "
            f"{num_heads}/{num_kv_heads} and {q.dtype}"
        )
    group = plan.group
    out = torch.empty_like(q)
    for padded in plan.padded:
        # [B*q, Hq, D] -> [B, Hkv, G*q, D]: the query rows of one KV head's group stacked
        num_seqs = padded.rows.shape[0] // padded.q_len
        qp = q[padded.rows].view(num_seqs, padded.q_len, num_kv_heads, group, head_dim)
        qp = qp.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
        shape = (num_seqs, -1, num_kv_heads, head_dim)
        kp = _gather(k_cache, padded.pages).view(shape).transpose(1, 2)  # [B, Hkv, L, D]
        vp = _gather(v_cache, padded.pages).view(shape).transpose(1, 2)
        op = F.scaled_dot_product_attention(
            qp, kp.to(q.dtype), vp.to(q.dtype), attn_mask=padded.mask, scale=scale
        )
        op = op.view(num_seqs, num_kv_heads, group, padded.q_len, head_dim).permute(0, 3, 1, 2, 4)
        op = op.reshape(-1, num_heads, head_dim)
        out[padded.real_rows] = op[padded.real]
    if not plan.prefills:
        return out
    # one gather per layer for every prefill chunk; [Hkv, rows, D] views of it per sequence
    kp_all = _gather(k_cache, plan.prefill_pages).transpose(0, 1).to(q.dtype)
    vp_all = _gather(v_cache, plan.prefill_pages).transpose(0, 1).to(q.dtype)
    q_all = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    for p in plan.prefills:
        # [Hkv, G, q_len, D] -> [1, Hkv, G*q_len, D]: rows of one KV head's group stacked
        # (4-D inputs keep SDPA on its fused CPU kernel; 3-D ones fall back to the math path)
        q_end, k_end = p.q_start + p.q_len, p.k_start + p.k_len
        qp = q_all[:, :, p.q_start : q_end].reshape(1, num_kv_heads, group * p.q_len, head_dim)
        kp = kp_all[None, :, p.k_start : k_end]
        vp = vp_all[None, :, p.k_start : k_end]
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, scale=scale
        )
        op = op.view(num_kv_heads, group, p.q_len, head_dim).permute(2, 0, 1, 3)
        out[p.q_start : q_end].view(p.q_len, num_kv_heads, group, head_dim).copy_(op)
    return out
