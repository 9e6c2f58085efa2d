"""RMSNorm, fused residual-add + RMSNorm, and gated RMSNorm.

All normalise in float32 and multiply by a float32 weight before casting back, so a
zero-centred norm (Qwen3.5 stores w and applies 1 + w) can be folded into the weight at load
time without losing precision in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_ext

_ADD_RMS_NORM_ARGS = (cpu_ext.P,) * 4 + (cpu_ext.I64,) * 3 + (cpu_ext.F32, cpu_ext.INT, cpu_ext.INT)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) float32 -> (..., D) in x.dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual stream: residual = x + residual (x alone if None), then
    returns (rms_norm(residual), residual). The reference: new tensors, autograd-safe."""
    residual = x if residual is None else x + residual
    return rms_norm(residual, weight, eps), residual


def add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` in one C pass, in place: the residual is updated and x is overwritten
    with the normalised values (the caller must not need x afterwards). Falls back to the
    reference under autograd or for other layouts/dtypes. x: (T, D) contiguous."""
    fn = cpu_ext.function("cpu_ops", "add_rms_norm", _ADD_RMS_NORM_ARGS) if cpu_ext.fast_path_ok(x, residual) else None
    if fn is None or x.dim() != 2 or not x.is_contiguous() or (residual is not None and residual.dtype != x.dtype):
        return add_rms_norm(x, residual, weight, eps)
    rows, dim = x.shape
    out = x if residual is not None else torch.empty_like(x)
    fn(x.data_ptr(), cpu_ext.ptr(residual), out.data_ptr(), weight.data_ptr(), rows, dim, dim, eps,
       int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out, (x if residual is None else residual)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) * silu(gate): the output norm of a Gated DeltaNet layer.

    x, gate (..., D); weight (D,) float32 -> (..., D) in x.dtype. Matches transformers'
    Qwen3.5 gated norm: the normalised x is cast to x.dtype before the weight multiply.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(gate.float())).to(x.dtype)
