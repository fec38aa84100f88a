"""Decode attention on the CPU over paged host KV (NEO-style offload), vectorized torch.

Sequences whose KV lives in host memory attend from the CPU while the accelerator attends
the rest of the batch. One new token per sequence; its K/V must already be stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpu_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, Hq, D] (Hq a multiple of Hkv); k_cache, v_cache: [num_pages, page_size, Hkv, D]
    on the CPU; block_tables: [B, P] int64 page ids (padded with any valid page);
    seq_lens: [B] context length of each sequence, its new token included. Returns
    [B, Hq, D] in q's dtype, computed in float32 (the CPU has no fast bf16 SDPA).

    >>> k = torch.randn(2, 4, 1, 8); v = torch.randn(2, 4, 1, 8); q = torch.randn(1, 2, 8)
    >>> cpu_decode_attention(q, k, v, torch.tensor([[1, 0]]), torch.tensor([5]), 0.35).shape
    torch.Size([1, 2, 8])
    """
    num_seqs, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    length = block_tables.shape[1] * page_size
    pages = block_tables.reshape(-1)
    shape = (num_seqs, length, num_kv_heads, head_dim)
    # [B, Hkv, L, D]: whole pages gathered as rows (index_select beats advanced indexing)
    k = k_cache.view(num_pages, -1).index_select(0, pages).view(shape).transpose(1, 2)
    v = v_cache.view(num_pages, -1).index_select(0, pages).view(shape).transpose(1, 2)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    valid = torch.arange(length)[None, :] < seq_lens[:, None]  # [B, L]
    mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qg.float(), k.float(), v.float(), attn_mask=mask, scale=scale
    )
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def store_decode_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Writes the new tokens' K/V ([B, Hkv, D]) into their flat slots [B] of the host cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
