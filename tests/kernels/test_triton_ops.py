"""The Triton RMSNorm, rotary, SiLU*mul, KV store and fixed-tile matmul against their torch
references, on CPU under the Triton interpreter.

Tolerances: float32 within 1e-5 (only the summation order differs); bfloat16 within one or
two bf16 ulps (2e-2 relative): the kernels round once where torch rounds after each op, and
the interpreter truncates float32 -> bfloat16 where a GPU (and torch) rounds to nearest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also set by tests/conftest.py

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")
if not triton.knobs.runtime.interpret:
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from llmudf.kernels import (  # noqa: E402
    AttentionMetadata,
    add_rms_norm,
    apply_rotary,
    rms_norm,
    rope_inv_freq,
    rotary_cos_sin,
    silu_mul,
    store_kv,
)
from llmudf.kernels import ops_triton as ops  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x, w = randn(5, 48, dtype=dtype), randn(48, dtype=dtype, seed=1)
    torch.testing.assert_close(ops.rms_norm_triton(x, w, 1e-6), rms_norm(x, w, 1e-6), **TOL[dtype])
    # [T, H, D] with strided rows, as the q/k norms of Qwen3 see it
    qkv = randn(3, 5 * 16, dtype=dtype)
    q = qkv[:, : 4 * 16].view(3, 4, 16)
    w16 = randn(16, dtype=dtype, seed=2)
    torch.testing.assert_close(
        ops.rms_norm_triton(q, w16, 1e-6), rms_norm(q, w16, 1e-6), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual(dtype):
    x, delta, w = randn(4, 40, dtype=dtype), randn(4, 40, dtype=dtype, seed=1), randn(40, seed=2)
    w = w.to(dtype)
    x_ref = x.clone()
    expected = add_rms_norm(x_ref, delta, w, 1e-5)
    got = ops.add_rms_norm_triton(x, delta, w, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(x, x_ref)  # the residual add rounds exactly as torch's add_
    else:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest, as torch does)
        torch.testing.assert_close(x, x_ref, **TOL[dtype])
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_rotary(dtype, scaling):
    cos, sin = rotary_cos_sin(rope_inv_freq(32, 10000.0, scaling), 200)
    positions = torch.tensor([0, 1, 7, 63, 64, 199])
    cos, sin = cos[positions].to(dtype), sin[positions].to(dtype)
    qkv = randn(6, 7 * 32, dtype=dtype)
    qk = qkv[:, : 6 * 32].view(6, 6, 32)  # rows strided like the model's fused q/k view
    torch.testing.assert_close(
        ops.apply_rotary_triton(qk, cos, sin), apply_rotary(qk, cos, sin), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate, up = randn(3, 1500, dtype=dtype), randn(3, 1500, dtype=dtype, seed=1)
    expected = silu_mul(gate.clone(), up)
    got = ops.silu_mul_triton(gate, up)
    assert got.data_ptr() == gate.data_ptr()  # in place, like the reference
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_padding_slots(dtype):
    num_pages, page_size, heads, dim = 5, 4, 3, 16
    k_ref, v_ref = torch.zeros(2, num_pages, page_size, heads, dim, dtype=dtype)
    k_got, v_got = k_ref.clone(), v_ref.clone()
    meta = AttentionMetadata.build([3, 4], [5, 4], [[2, 0], [4]], page_size)
    kv = randn(7, 2 * heads, dim, dtype=dtype)
    k, v = kv[:, :heads], kv[:, heads:]  # strided views, as the model passes them
    store_kv(k, v, k_ref, v_ref, meta.slot_mapping)
    ops.store_kv_triton(k, v, k_got, v_got, meta.slot_mapping)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    padded = torch.cat([meta.slot_mapping, torch.tensor([-1])])
    extra = randn(8, heads, dim, dtype=dtype, seed=3)
    ops.store_kv_triton(extra, extra, k_got, v_got, padded)
    assert torch.equal(k_got.view(-1, heads, dim)[meta.slot_mapping], extra[:7])
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool)
    untouched[meta.slot_mapping] = False
    assert torch.equal(k_got.view(-1, heads, dim)[untouched], k_ref.view(-1, heads, dim)[untouched])


TILES = (16, 16, 16, 4, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_and_is_row_invariant(dtype):
    x, w, b = randn(37, 40, dtype=dtype), randn(24, 40, dtype=dtype, seed=1), randn(24, seed=2)
    b = b.to(dtype)
    got = ops.linear_triton(x, w, b, tiles=TILES)
    expected = F.linear(x.float(), w.float(), b.float()).to(dtype)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # a row's result is bitwise the same alone as among 36 others
    for row in (0, 17, 36):
        assert torch.equal(
            ops.linear_triton(x[row : row + 1], w, b, tiles=TILES), got[row : row + 1]
        )
