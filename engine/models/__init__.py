"""llmudf.engine.models: our PyTorch implementation of the Llama family over a paged KV cache.

>>> model = build_model(tiny_config("qwen3", num_layers=1))
>>> model.config.qk_norm
True
"""

from __future__ import annotations

import torch

from llmudf.engine.model_config import ModelConfig
from llmudf.engine.models.llama import KVCache, LlamaForCausalLM
from llmudf.kernels import KernelSet, select_kernels

# the tiny test tokenizer (tests/engine/conftest.py) has 259 tokens; <|im_end|> is id 2
_TINY_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    bos_token_id=None,
    eos_token_ids=(2,),
)
_TINY_FAMILY = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(tie_word_embeddings=False, num_kv_heads=1),
    "qwen2": dict(tie_word_embeddings=True, qkv_bias=True),
    "qwen3": dict(tie_word_embeddings=True, qk_norm=True, head_dim=32),
}


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A small random-init-friendly config of one family, for tests.

    >>> tiny_config("qwen2").qkv_bias
    True
    """
    if family not in _TINY_FAMILY:
        raise ValueError(f"unknown family {family!r}; expected one of {list(_TINY_FAMILY)}")
    return ModelConfig(family=family, **{**_TINY_BASE, **_TINY_FAMILY[family], **overrides})


def build_model(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    kernels: str | KernelSet = "auto",
    deterministic: bool = True,
) -> LlamaForCausalLM:
    """A model of `config` on `device`; random weights (normal, std 0.02) drawn from `seed`, or
    uninitialized memory when `seed` is None (the weight loader fills it). Its kernels are
    chosen here, once (`llmudf.kernels.select_kernels`): Triton on CUDA, torch on CPU unless
    `kernels` says otherwise. The parameters are allocated once, on the device, in `dtype`.

    >>> build_model(tiny_config("llama"), seed=1).embed_tokens.weight.shape
    torch.Size([320, 64])
    """
    ops = select_kernels(device, kernels, deterministic)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, ops).to(dtype)
    model = model.to_empty(device=device)
    if seed is not None:
        # drawn on the CPU in float32 (the same weights on every device), one tensor at a time
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                values = (
                    torch.ones(param.shape)
                    if name.endswith("norm.weight")
                    else torch.randn(param.shape, generator=gen) * 0.02
                )
                param.copy_(values)
    model.reset_rotary()
    return model.eval().requires_grad_(False)


__all__ = ["KVCache", "LlamaForCausalLM", "ModelConfig", "build_model", "tiny_config"]
