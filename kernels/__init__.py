"""llmudf.kernels: paged attention, RMSNorm and rotary embeddings (torch references).

Triton versions (a later issue) must match these and are chosen once at model construction.
"""

from llmudf.kernels.attention import (
    AttentionMetadata,
    AttentionPlan,
    paged_attention,
    store_kv,
)
from llmudf.kernels.norm import rms_norm
from llmudf.kernels.rotary import apply_rotary, rope_inv_freq, rotary_cos_sin

__all__ = [
    "AttentionMetadata",
    "AttentionPlan",
    "apply_rotary",
    "paged_attention",
    "rms_norm",
    "rope_inv_freq",
    "rotary_cos_sin",
    "store_kv",
]
