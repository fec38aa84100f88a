"""Paged attention: the torch reference (gather pages + scaled dot-product attention).

Per layer the KV cache is `k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]`.
One forward runs a flat batch of T new tokens from B sequences (prefill chunks and decodes
mixed), described by `AttentionMetadata`. New token i of sequence b sits at position
`seq_lens[b] - q_len_b + i` and attends causally to every position <= its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # built on the first layer's call and reused by every other layer of the same step
    _plan: _TorchPlan | None = field(default=None, repr=False, compare=False)

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
class _PaddedBatch:
    """Sequences whose new tokens run as one SDPA call, padded to `q_len` queries and
    `num_pages * page_size` keys each. Padding queries repeat their sequence's last token and
    padding keys are masked out, so no row is fully masked and real rows are unchanged."""

    q_rows: torch.Tensor  # [B*q_len] flat-batch row of each (padded) query slot
    pages: torch.Tensor  # [B, num_pages] page ids (padding pages are masked)
    mask: torch.Tensor  # [B, 1, G*q_len, num_pages * page_size] bool, True = attend
    q_len: int
    keep: torch.Tensor | None  # [T_b] real slots among the B*q_len; None: no padding
    out_rows: torch.Tensor  # [T_b] flat-batch rows the real slots' outputs go to


@dataclass
class _TorchPlan:
    """Index tensors shared by all layers of one step (built once from the metadata). K/V are
    gathered a whole page at a time, which copies far faster than token by token. Decodes
    and prefill chunks run as two padded batches: one SDPA call per layer for each instead
    of one per prefill chunk (the per-call overhead dominated on CPU)."""

    batches: list[_PaddedBatch]


def _plan(meta: AttentionMetadata, page_size: int, group: int) -> _TorchPlan:
    cu = meta.cu_seqlens_q.tolist()
    seq_lens = meta.seq_lens.tolist()
    decodes, prefills = [], []
    for b in range(len(seq_lens)):
        (decodes if cu[b + 1] - cu[b] == 1 else prefills).append(b)
    batches = [
        _padded_batch(meta, cu, seq_lens, seqs, page_size, group)
        for seqs in (decodes, prefills)
        if seqs
    ]
    return _TorchPlan(batches)


def _padded_batch(
    meta: AttentionMetadata,
    cu: list[int],
    seq_lens: list[int],
    seqs: list[int],
    page_size: int,
    group: int,
) -> _PaddedBatch:
    device = meta.block_tables.device
    q_lens = [cu[b + 1] - cu[b] for b in seqs]
    max_q = max(q_lens)
    max_pages = -(-max(seq_lens[b] for b in seqs) // page_size)
    # padding slot i >= q_len repeats the last token: row cu[b] + q_len - 1
    slot = torch.arange(max_q, device=device)[None, :]  # [1, Lq]
    q_len_t = torch.tensor(q_lens, device=device)[:, None]  # [B, 1]
    real = slot < q_len_t  # [B, Lq]
    slot = torch.minimum(slot, q_len_t - 1)
    start = torch.tensor([cu[b] for b in seqs], device=device)[:, None]
    k_len = torch.tensor([seq_lens[b] for b in seqs], device=device)[:, None]
    q_pos = k_len - q_len_t + slot  # [B, Lq] position of each query slot
    key = torch.arange(max_pages * page_size, device=device)
    mask = key[None, None, :] <= q_pos[:, :, None]  # [B, Lq, L], causal (and within k_len)
    # the query heads of one KV head are folded into the query length: G copies, g-major
    mask = mask.repeat(1, group, 1)[:, None]
    q_rows = (start + slot).flatten()
    keep = None if all(n == max_q for n in q_lens) else real.flatten().nonzero().squeeze(1)
    out_rows = q_rows if keep is None else q_rows[keep]
    tables = meta.block_tables[torch.tensor(seqs, device=device), :max_pages].long()
    return _PaddedBatch(q_rows, tables, mask, max_q, keep, out_rows)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' paged K/V (torch reference).

    q: [T, Hq, D] (Hq a multiple of Hkv); the new tokens' K/V must already be stored with
    `store_kv`. Returns [T, Hq, D]. Decodes run as one batched SDPA call and prefill chunks
    as another (padded and masked); the query heads of one KV head are folded into the query
    length so GQA needs no K/V copies.
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if meta._plan is None:
        meta._plan = _plan(meta, page_size, group)
    out = torch.empty_like(q)
    for pb in meta._plan.batches:
        num_seqs, max_pages = pb.pages.shape
        # [B*Lq, Hkv*G, D] -> [B, Hkv, G*Lq, D] (4-D inputs keep SDPA on its fused CPU kernel)
        qb = q[pb.q_rows].view(num_seqs, pb.q_len, num_kv_heads, group, head_dim)
        qb = qb.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * pb.q_len, head_dim)
        shape = (num_seqs, max_pages * page_size, num_kv_heads, head_dim)
        kb = k_cache[pb.pages].view(shape).transpose(1, 2)  # [B, Hkv, L, D]
        vb = v_cache[pb.pages].view(shape).transpose(1, 2)
        ob = F.scaled_dot_product_attention(
            qb, kb.to(q.dtype), vb.to(q.dtype), attn_mask=pb.mask, scale=scale
        )
        ob = ob.view(num_seqs, num_kv_heads, group, pb.q_len, head_dim).permute(0, 3, 1, 2, 4)
        ob = ob.reshape(num_seqs * pb.q_len, num_heads, head_dim)
        out[pb.out_rows] = ob if pb.keep is None else ob[pb.keep]
    return out
