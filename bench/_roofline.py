"""The physical limit of a CPU run: this machine's fp32 matmul peak, measured in the same run,
and the FLOPs a Llama-family forward pass really does, counted from the tokens it computed.

`fraction_of_roofline = FLOPs / (peak FLOP/s x wall seconds)`: 1.0 would mean every second
went into matmuls at the speed of one large `torch.mm`.

FLOPs per computed token at position p (0-based), per layer: 2 x the weights of the seven
projections (q, k, v, o, gate, up, down), plus attention over its p + 1 keys (q.k and the
weighted sum of v: 2 x 2 x heads x head_dim x (p + 1), causal); plus 2 x hidden x vocab per
row of logits. Norms, rotary, activations and sampling are left out (a few % at most).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def matmul_peak_flops(size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of the fastest of `repeats` fp32 `torch.mm` of two `size` x `size` matrices.

    One measurement can read low (a cold thread pool, a clock still ramping up: 122 against
    184 GFLOP/s seen on this machine a minute apart), which would inflate a fraction of it
    past 1; callers measure again after their runs and keep the higher (`max`)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)  # untimed: thread pool and allocator warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@dataclass(frozen=True, slots=True)
class FlopModel:
    """The shape numbers that set a Llama-family model's forward FLOPs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg) -> FlopModel:
        """From llmudf's ModelConfig (or anything with the same field names)."""
        return cls(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size,
        )

    @property
    def matmul_weights_per_layer(self) -> int:
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden_size * self.intermediate_size

    def flops(self, spans: list[tuple[int, int]], num_logits: int) -> float:
        """FLOPs of computing, for each (first, end) span, the tokens at positions
        first..end-1 of one sequence (their keys: every earlier position, cached or not),
        plus `num_logits` rows of logits."""
        num_tokens = sum(end - first for first, end in spans)
        # sum over p in [first, end) of (p + 1)
        num_keys = sum((end * (end + 1) - first * (first + 1)) // 2 for first, end in spans)
        per_token = 2 * self.num_layers * self.matmul_weights_per_layer
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * num_keys
        logits = 2 * self.hidden_size * self.vocab_size * num_logits
        return float(per_token * num_tokens + attention + logits)
