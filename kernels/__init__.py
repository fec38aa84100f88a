"""llmudf.kernels: paged attention, RMSNorm, rotary embeddings, SiLU*mul and the KV store.

Each has a torch reference here and a Triton version (`attention_triton.py`, `ops_triton.py`,
imported only when chosen); `select_kernels` picks the set once, when a model is built.
"""

from llmudf.kernels.activation import silu_mul
from llmudf.kernels.attention import (
    AttentionMetadata,
    AttentionPlan,
    paged_attention,
    store_kv,
)
from llmudf.kernels.norm import add_rms_norm, rms_norm
from llmudf.kernels.rotary import apply_rotary, rope_inv_freq, rotary_cos_sin
from llmudf.kernels.select import TORCH_KERNELS, KernelSet, select_kernels

__all__ = [
    "AttentionMetadata",
    "AttentionPlan",
    "KernelSet",
    "TORCH_KERNELS",
    "add_rms_norm",
    "apply_rotary",
    "paged_attention",
    "rms_norm",
    "rope_inv_freq",
    "rotary_cos_sin",
    "select_kernels",
    "silu_mul",
    "store_kv",
]
