"""The Llama family (Llama, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

The whole flat batch of new tokens ([T], prefill chunks and decodes mixed) goes through each
linear layer at once; q/k/v are fused into one matmul at load time, and attention reads and
writes the paged cache through `llmudf.kernels`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmudf.engine.model_config import ModelConfig
from llmudf.kernels import TORCH_KERNELS, AttentionMetadata, AttentionPlan, KernelSet, rope_inv_freq

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_pages, page_size, num_kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelSet):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x += delta in place (the residual), then the norm of x (fused on Triton)."""
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelSet):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x,
        cos,
        sin,
        meta: AttentionMetadata,
        plan: AttentionPlan,
        kv_cache: KVCache,
        rows=None,
        offload=None,
    ) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], or [N, hidden] for the flat-batch `rows` [N] only
        (every token's K/V is still stored). `offload`: this layer's part of a step whose last
        rows decode over host KV (engine/cpu_offload.py `LayerDecode`)."""
        num_tokens, ops = x.shape[0], self.ops
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q_size, kv_size = self.q_size, self.kv_size
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k side by side in one rotary call: [T, Hq + Hkv, D]
            qk = qkv[:, : q_size + kv_size].view(num_tokens, -1, self.head_dim)
            qk = ops.apply_rotary(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin)
        if offload is None:
            ops.store_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
            out = ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, plan)
        else:  # NEO: the CPU attends the last rows over host KV while the device attends the rest
            out = offload.attend(q, k, v, kv_cache, meta, plan, self.scale, ops)
        out = out.view(num_tokens, self.q_size)
        return ops.linear(out if rows is None else out[rows], self.o_proj.weight)


class MLP(nn.Module):
    # gate and up stay two matmuls: fused, their [T, 2 * intermediate] product of a 4096-token
    # step is past glibc's 32 MiB mmap ceiling and so page-faulted afresh in every layer on CPU
    # (measured: the MLP 15% slower); apart, each product also takes SiLU / mul in place
    def __init__(self, cfg: ModelConfig, ops: KernelSet):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.ops.linear
        gate = linear(x, self.gate_proj.weight)
        hidden = self.ops.silu_mul(gate, linear(x, self.up_proj.weight))
        return linear(hidden, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelSet):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin, meta, plan, kv_cache, rows=None, offload=None) -> torch.Tensor:
        """x: [T, hidden], updated in place; with `rows` [N], a new [N, hidden] of those rows."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta, plan, kv_cache, rows, offload)
        if rows is None:
            normed = self.post_attention_layernorm.add_forward(x, h)
        else:
            x = h.add_(x[rows])
            normed = self.post_attention_layernorm(x)
        return x.add_(self.mlp(normed))


# HF weight name suffix -> (our fused parameter, shard index); shards are concatenated on dim 0
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
}


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder that runs flat batches against a paged KV cache.

    >>> from llmudf.engine.models import build_model, tiny_config
    >>> model = build_model(tiny_config("llama"))
    >>> model.config.family
    'llama'
    """

    def __init__(self, cfg: ModelConfig, ops: KernelSet = TORCH_KERNELS):
        super().__init__()
        self.config = cfg
        self.ops = ops  # the kernel set, chosen once (build_model)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        # float32 whatever the model dtype; set by reset_rotary once the weights have a device
        self.inv_freq = torch.empty(0)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        output_rows: torch.Tensor | None = None,
        plan: AttentionPlan | None = None,
        offload=None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm, or
        [N, hidden] for the flat-batch `output_rows` [N] only: the last layer then skips its
        o_proj and MLP on the other tokens, whose K/V is all a later step needs. `plan`: the
        step's AttentionPlan, shared by every layer (None: built here from `meta`). `offload`:
        the step's `HostDecodeBatch` (engine/cpu_offload.py) when its last rows decode over
        host KV on the CPU; `meta` then covers the other rows only (None if there are none)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        dtype = self.embed_tokens.weight.dtype
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if plan is None and meta is not None:
            cfg, page_size = self.config, kv_caches[0][0].shape[1]
            plan = self.ops.build_plan(meta, page_size, cfg.num_heads, cfg.num_kv_heads, dtype)
        x = self.embed_tokens(input_ids)
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            rows = output_rows if i == last else None
            layer_offload = None if offload is None else offload.layer(i)
            x = layer(x, cos, sin, meta, plan, kv_cache, rows, layer_offload)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None):
        """hidden [N, hidden] -> logits [N, vocab] in float32; with `token_ids` [U], the logits
        of those tokens only: [N, U]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if token_ids is not None:
            weight = weight.index_select(0, token_ids.to(weight.device))
        return self.ops.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...) into the model,
        fusing q/k/v; raises if a parameter is missing or a shape disagrees."""
        params = dict(self.named_parameters())
        needed = {name: 3 if ".qkv_proj." in name else 1 for name in params}
        loaded: dict[str, set[int]] = {}
        for hf_name, tensor in weights:
            name, shard = self._our_name(hf_name)
            if name is None:
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {hf_name!r} for a {self.config.family} model")
            param = params[name]
            with torch.no_grad():
                target = param if shard is None else param.narrow(0, *self._qkv_range(shard))
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)
            loaded.setdefault(name, set()).add(shard or 0)
        missing = [n for n, k in needed.items() if len(loaded.get(n, ())) < k]
        if missing:
            raise ValueError(f"missing weights for {len(missing)} parameters, e.g. {missing[:3]}")

    def reset_rotary(self) -> None:
        """Compute the rotary inverse frequencies on the weights' device (call after moving)."""
        cfg = self.config
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.inv_freq = inv_freq.to(self.embed_tokens.weight.device)

    # -- private helpers -------------------------------------------------------------------

    def _our_name(self, hf_name: str) -> tuple[str | None, int | None]:
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" and self.lm_head is None:
            return None, None  # tied: the embedding is the head
        if name.endswith("rotary_emb.inv_freq"):
            return None, None
        for hf_part, (ours, shard) in _FUSED.items():
            if f".{hf_part}." in name:
                return name.replace(hf_part, ours), shard
        return name, None

    def _qkv_range(self, shard: int) -> tuple[int, int]:
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return ((0, q), (q, kv), (q + kv, kv))[shard]
