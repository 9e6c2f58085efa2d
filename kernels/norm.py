"""RMSNorm and gated RMSNorm.

Both normalise in float32 and multiply by a float32 weight before casting back, so a
zero-centred norm (Qwen3.5 stores w and applies 1 + w) can be folded into the weight at load
time without losing precision in bf16.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) float32 -> (..., D) in x.dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) * silu(gate): the output norm of a Gated DeltaNet layer.

    x, gate (..., D); weight (D,) float32 -> (..., D) in x.dtype. Matches transformers'
    Qwen3.5 gated norm: the normalised x is cast to x.dtype before the weight multiply.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(gate.float())).to(x.dtype)
