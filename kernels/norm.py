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
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual stream, kept in float32: residual = residual + x (x may be None),
    returns (rms_norm(residual) in `dtype`, residual). The reference: new tensors,
    autograd-safe. residual (T, D) float32; x (T, D) in any float dtype."""
    if x is not None:
        residual = residual + x.float()
    return rms_norm(residual, weight, eps).to(dtype), residual


def add_rms_norm_cpu(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` in one C pass, in place: the residual is updated and the normalised
    values overwrite x (the caller must not need x afterwards; a new tensor when x is None).
    Falls back to the reference under autograd or for other layouts/dtypes."""
    fn = cpu_ext.function("cpu_ops", "add_rms_norm", _ADD_RMS_NORM_ARGS) if cpu_ext.fast_path_ok(x, residual) else None
    if (
        fn is None
        or residual.dtype != torch.float32
        or not residual.is_contiguous()
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
        or (x is not None and (x.dtype != dtype or x.shape != residual.shape or not x.is_contiguous()))
    ):
        return add_rms_norm(x, residual, weight, eps, dtype)
    rows, dim = residual.shape
    out = x if x is not None else torch.empty((rows, dim), dtype=dtype)
    fn(cpu_ext.ptr(x), residual.data_ptr(), out.data_ptr(), weight.data_ptr(), rows, dim, dim, eps,
       int(dtype == torch.bfloat16), torch.get_num_threads())
    return out, residual


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) * silu(gate): the output norm of a Gated DeltaNet layer.

    x, gate (..., D); weight (D,) float32 -> (..., D) in x.dtype. Matches transformers'
    Qwen3.5 gated norm: the normalised x is cast to x.dtype before the weight multiply.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(gate.float())).to(x.dtype)
