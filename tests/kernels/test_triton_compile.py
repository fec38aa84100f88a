"""The Triton kernels compile for a real GPU (sm_90, Hopper) without one: the interpreter
accepts code that the compiler rejects, so every kernel also goes through Triton's compiler
(down to the GPU binary) with the shapes of a Llama-3.1-8B step in bf16."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmudf.kernels import attention_triton as attn, ops_triton as ops

def compile(fn, args, constexprs):
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__

b, f, i = "*bf16", "*fp32", "*i32"
attention = dict(
    Q=b, K=b, V=b, Out=b, Lse=f, PartO=f, PartLse=f, cu_seqlens_q=i, seq_lens=i, kv_starts=i,
    block_tables=i, scale_log2="fp32", num_heads="i32", max_splits="i32", split_size="i32",
    stride_qt="i32", stride_qh="i32", stride_ks="i32", stride_kh="i32", stride_bt="i32",
    stride_ot="i32", stride_oh="i32",
)
for group, cascade in ((4, False), (8, True)):
    compile(attn._attention_kernel, attention, dict(
        GROUP=group, GROUP_PAD=group, BLOCK_M=64 // group, BLOCK_N=64, HEAD_DIM=128,
        BLOCK_D=128, PAGE_SIZE=16, CAUSAL=not cascade, HAS_KV_START=cascade,
        WRITE_LSE=cascade, UPCAST=False, IEEE=False))
compile(attn._combine_kernel, dict(Out=b, Lse=f, PartO=f, PartLse=f, token_splits=i,
    num_heads="i32", max_splits="i32", stride_ot="i32", stride_oh="i32"),
    dict(HEAD_DIM=128, BLOCK_D=128, WRITE_LSE=True))
compile(ops._matmul_kernel, dict(A=b, B=b, Bias=b, C=b, M="i32", N="i32", K="i32",
    stride_am="i32", stride_bn="i32", stride_cm="i32"),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, HAS_BIAS=True, UPCAST=False))
compile(ops._rms_norm_kernel, dict(X=b, Delta=b, W=b, Out=b, stride_x="i32", stride_d="i32",
    stride_o="i32", n_cols="i32", eps="fp32"), dict(BLOCK=4096, HAS_DELTA=True))
compile(ops._rotary_kernel, dict(X=b, Cos=b, Sin=b, Out=b, stride_xt="i32", stride_xh="i32",
    stride_ct="i32", num_heads="i32"), dict(HALF=64, BLOCK_H=64, BLOCK_HALF=64))
compile(ops._silu_mul_kernel, dict(Gate=b, Up=b, n="i32"), dict(BLOCK=1024))
compile(ops._store_kv_kernel, dict(K=b, V=b, KCache=b, VCache=b, slots="*i64",
    stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32", num_kv_heads="i32"),
    dict(HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
