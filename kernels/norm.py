"""RMSNorm, plain and with the residual add fused, torch reference."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / rms(x) * weight` over the last dim, computed in float32 like the HF models.

    >>> rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), 0.0)
    tensor([[0.8485, 1.1314]])
    """
    out = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return out.to(x.dtype).mul_(weight)  # a new tensor either way: scaled in place


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """`x += delta` in place (the residual stream), then `rms_norm(x)` as a new tensor.

    >>> x = torch.tensor([[1.0, 2.0]])
    >>> add_rms_norm(x, torch.tensor([[2.0, 2.0]]), torch.ones(2), 0.0), x
    (tensor([[0.8485, 1.1314]]), tensor([[3., 4.]]))
    """
    return rms_norm(x.add_(delta), weight, eps)
