"""RMSNorm (plain and with the residual add fused), rotary, SiLU*mul, the KV store and a
batch-invariant matmul, in Triton. Each matches its torch reference (`norm.py`, `rotary.py`,
`activation.py`, `attention.store_kv`, `F.linear`).

Every kernel computes a row from that row alone, with a reduction order fixed by the tile
shape, never by the number of rows; so a token's result does not depend on the batch it is
in. `linear` is the matmul of deterministic mode: fixed tiles, no split-K, unlike cuBLAS,
whose choice of kernel (and so of summation order) changes with the number of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

_UPCAST_DOTS = bool(knobs.runtime.interpret)  # see attention_triton.py


@triton.jit
def _rms_norm_kernel(
    X, Delta, W, Out, stride_x, stride_d, stride_o, n_cols, eps,
    BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:  # x += delta, rounded to the model dtype as torch's add_ does
        x = (x.to(tl.float32) + tl.load(Delta + row * stride_d + cols, mask=ok, other=0.0)).to(
            X.dtype.element_ty
        )
        tl.store(X + row * stride_x + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in Triton: x [..., H] -> a new [..., H]."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _norm(rows, None, weight, out, eps)
    return out.view(x.shape)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """`add_rms_norm` in Triton: x [N, H] += delta [N, H] in place; returns rms_norm(x)."""
    if x.dim() != 2 or x.stride(1) != 1 or delta.shape != x.shape or delta.stride(1) != 1:
        raise ValueError("add_rms_norm_triton needs x and delta [N, H], rows contiguous")
    out = torch.empty_like(x)
    _norm(x, delta, weight, out, eps)
    return out


def _norm(x, delta, weight, out, eps) -> None:
    num_rows, num_cols = x.shape
    if num_rows == 0:
        return
    _rms_norm_kernel[(num_rows,)](
        x, x if delta is None else delta, weight, out,
        x.stride(0), 0 if delta is None else delta.stride(0), out.stride(0), num_cols, eps,
        BLOCK=triton.next_power_of_2(num_cols), HAS_DELTA=delta is not None,
    )  # fmt: skip


@triton.jit
def _rotary_kernel(
    X, Cos, Sin, Out, stride_xt, stride_xh, stride_ct, num_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h < num_heads)[:, None] & (i < HALF)[None, :]
    x_off = t * stride_xt + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=ok, other=0.0).to(tl.float32)
    c_ok = i < HALF
    cos1 = tl.load(Cos + t * stride_ct + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + t * stride_ct + HALF + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + t * stride_ct + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + t * stride_ct + HALF + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    o_off = t * num_heads * 2 * HALF + h[:, None] * 2 * HALF + i[None, :]
    tl.store(Out + o_off, (x1 * cos1 - x2 * sin1).to(Out.dtype.element_ty), mask=ok)
    tl.store(Out + o_off + HALF, (x2 * cos2 + x1 * sin2).to(Out.dtype.element_ty), mask=ok)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in Triton: x [T, H, D] (rows may be strided), cos, sin [T, D] -> a new
    contiguous [T, H, D]."""
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("apply_rotary_triton needs the last dims of x, cos and sin contiguous")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), num_heads,
            HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_HALF=triton.next_power_of_2(half),
        )  # fmt: skip
    return out


# ints that change from step to step (row counts) are not specialized on: no recompiles
@triton.jit(do_not_specialize=["n"])
def _silu_mul_kernel(Gate, Up, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(Gate + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(Up + i, mask=ok, other=0.0).to(tl.float32)
    # silu rounded to the model dtype first, as torch's two in-place ops do
    s = (g / (1.0 + tl.exp(-g))).to(Gate.dtype.element_ty).to(tl.float32)
    tl.store(Gate + i, (s * u).to(Gate.dtype.element_ty), mask=ok)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu_mul` in Triton: in place in `gate` (contiguous, same shape as `up`)."""
    if not (gate.is_contiguous() and up.is_contiguous()) or gate.shape != up.shape:
        raise ValueError("silu_mul_triton needs contiguous gate and up of one shape")
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, 1024),)](gate, up, n, BLOCK=1024)
    return gate


@triton.jit
def _store_kv_kernel(
    K, V, KCache, VCache, slots, stride_kt, stride_kh, stride_vt, stride_vh, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + t)
    if slot < 0:  # a padding token (CUDA-graph buckets): nothing to store
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h < num_kv_heads)[:, None] & (d < HEAD_DIM)[None, :]
    c_off = slot * num_kv_heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
    tl.store(KCache + c_off, k.to(KCache.dtype.element_ty), mask=ok)
    tl.store(VCache + c_off, v.to(VCache.dtype.element_ty), mask=ok)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    """`store_kv` in Triton; a slot of -1 is skipped (padding)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv_triton needs contiguous KV caches")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("store_kv_triton needs the last dim of k and v contiguous")
    if num_tokens:
        _store_kv_kernel[(num_tokens,)](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_kv_heads,
            HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    A, B, Bias, C, M, N, K, stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptr = B + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(a_ptr + k0, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k0, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        if UPCAST:  # see attention_triton.py: each element summed on its own
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif a.dtype == tl.float32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): fixed, whatever the number of rows; 64
# rows keep a decode step of a few dozen sequences from leaving most SMs idle
MATMUL_TILES = (64, 128, 64, 4, 3)


def linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles=None
) -> torch.Tensor:
    """`F.linear` with fixed tiles: x [M, K] @ weight [N, K].T (+ bias) -> [M, N]; each row's
    result is the same whatever M."""
    block_m, block_n, block_k, num_warps, num_stages = tiles or MATMUL_TILES
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    num_rows, k = rows.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"linear_triton: weight {tuple(weight.shape)} does not take {k} inputs")
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if num_rows:
        grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n, block_n))
        _matmul_kernel[grid](
            rows, weight, weight if bias is None else bias, out, num_rows, n, k,
            rows.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
            UPCAST=_UPCAST_DOTS, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
