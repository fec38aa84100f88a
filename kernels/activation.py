"""SiLU(gate) * up, the Llama MLP's activation, torch reference."""

import torch
import torch.nn.functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, computed in place in `gate` (which is returned).

    >>> silu_mul(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
    tensor([0.0000, 1.4621])
    """
    return F.silu(gate, inplace=True).mul_(up)
