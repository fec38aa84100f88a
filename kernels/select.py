"""The kernel set of a model, chosen once when it is built: torch references or Triton.

>>> ops = select_kernels("cpu")
>>> ops.name, ops.deterministic
('torch', True)
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmudf.kernels.activation import silu_mul
from llmudf.kernels.attention import AttentionPlan, paged_attention, store_kv
from llmudf.kernels.norm import add_rms_norm, rms_norm
from llmudf.kernels.rotary import apply_rotary

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelSet:
    """The functions a model calls; `build_plan(meta, page_size, num_heads, num_kv_heads,
    dtype)` makes the step's attention plan that `paged_attention` takes.

    deterministic: batch-invariant kernels (fixed attention split, fixed-tile matmul, no
    cascade), so a sequence's greedy answer does not depend on its batch or the cache.
    """

    name: str
    deterministic: bool
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rotary: Callable
    silu_mul: Callable
    store_kv: Callable
    paged_attention: Callable
    build_plan: Callable
    linear: Callable
    # graph-capturable decode steps (Triton only): the plan builder takes `max_seq_len`
    supports_cuda_graphs: bool = False


TORCH_KERNELS = KernelSet(
    name="torch",
    deterministic=True,  # the CPU reference is batch-invariant as it is
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    apply_rotary=apply_rotary,
    silu_mul=silu_mul,
    store_kv=store_kv,
    paged_attention=paged_attention,
    build_plan=AttentionPlan.build,
    linear=F.linear,
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_kernels(
    device: torch.device | str, kernels: str | KernelSet = "auto", deterministic: bool = True
) -> KernelSet:
    """The kernel set for `device`. `kernels` "auto": Triton on CUDA when it is importable,
    else the torch references; "triton" on a CPU needs the Triton interpreter
    (`TRITON_INTERPRET=1`, tests only). A KernelSet is returned as it is."""
    if isinstance(kernels, KernelSet):
        return kernels
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    device = torch.device(device)
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernels == "torch":
        return TORCH_KERNELS
    if not triton_available():
        raise ValueError("kernels='triton' needs the triton package (pip install triton)")
    from triton import knobs

    if device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(
            f"kernels='triton' runs on CUDA devices, not {device.type!r} "
            "(on CPU only under the Triton interpreter, TRITON_INTERPRET=1)"
        )
    return triton_kernels(deterministic)


@functools.cache
def triton_kernels(
    deterministic: bool = True,
    split_size: int = 1024,
    rows_per_tile: int = 64,
    block_n: int = 64,
    matmul_tiles: tuple[int, ...] | None = None,
) -> KernelSet:
    """The Triton set. Deterministic: fixed split size and the fixed-tile matmul. Otherwise
    the split size follows each step's shape, decodes behind a shared prefix run as a
    cascade, and linear layers use cuBLAS. The tile arguments exist for the interpreter's
    tests (small tiles run faster there)."""
    from llmudf.kernels import attention_triton as attn
    from llmudf.kernels import ops_triton as ops

    plan = functools.partial(
        attn.TritonAttentionPlan.build,
        split_size=split_size if deterministic else None,
        cascade=not deterministic,
        rows_per_tile=rows_per_tile,
        block_n=block_n,
    )
    linear = F.linear
    if deterministic:
        linear = functools.partial(ops.linear_triton, tiles=matmul_tiles)
    return KernelSet(
        name="triton",
        deterministic=deterministic,
        rms_norm=ops.rms_norm_triton,
        add_rms_norm=ops.add_rms_norm_triton,
        apply_rotary=ops.apply_rotary_triton,
        silu_mul=ops.silu_mul_triton,
        store_kv=ops.store_kv_triton,
        paged_attention=attn.paged_attention_triton,
        build_plan=plan,
        linear=linear,
        supports_cuda_graphs=True,
    )
