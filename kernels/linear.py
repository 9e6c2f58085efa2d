"""Dense projections: F.linear (the reference, and the only path under autograd) and fast bf16
paths on CPU, picked once per process by what its CPU has:

- AMX (Intel Sapphire Rapids and later): `amx_linear`, a C kernel (csrc/amx_linear.c) that
  reads the weight in its plain layout. The weights stay the single copy the engine shares
  with the trainer; nothing is packed (`prepack_wanted` is False).
- otherwise, oneDNN: `torch.ops.mkldnn._linear_pointwise` with a weight reordered once into
  oneDNN's blocked layout runs the bf16 projections of a small model ~1.3-2x faster than
  F.linear at 1-64 rows (bench/RESULTS.md). The packed copy is opaque, has no autograd and
  costs the weight's size again, so it is made only when asked for (`pack_weight`; the engine
  does unless `prepack_weights` is off).
- without AMX and without a packed copy, AVX512-BF16 CPUs (AMD Zen 4, Intel Cooper Lake) use
  `avx512_linear` (csrc/avx512_linear.c, vdpbf16ps on the plain weight) instead of F.linear.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import cpu_ext

# x, x row stride, weight, weight row stride, bias or NULL, out, T, K, N, threads -> 0 or < 0
_ARGS = (cpu_ext.P, cpu_ext.I64, cpu_ext.P, cpu_ext.I64, cpu_ext.P, cpu_ext.P) + (cpu_ext.I64,) * 3 + (cpu_ext.INT,)


@functools.cache
def _kernel(name: str) -> Callable | None:
    """csrc/<name>.c's `<name>` function, or None when it cannot be built or cannot run in this
    process (for AMX: the CPU lacks it, or Linux refused the tile state). Asked once."""
    init = cpu_ext.function(name, f"{name}_init", (), cpu_ext.INT)
    if init is None or init() != 0:
        return None
    return cpu_ext.function(name, name, _ARGS, cpu_ext.INT)


def amx_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether projections of `dtype` on `device` run on the AMX kernel (CPU, bf16, AMX here)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _kernel("amx_linear") is not None


def avx512_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `avx512_linear` runs here (CPU, bf16, a build for a CPU with AVX512-BF16)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _kernel("avx512_linear") is not None


def _plain_linear(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) through a C kernel with amx_linear's contract, or None when
    there is none (`fn` None) or it does not take these inputs. Decode calls this ~120 times a
    token, so the checks use the cheapest tensor attributes."""
    bf16 = torch.bfloat16
    if fn is None or x.dtype != bf16 or weight.dtype != bf16 or not x.is_cpu or not weight.is_cpu or weight.ndim != 2:
        return None
    out_features, in_features = weight.shape
    w_stride = weight.stride()
    if w_stride[1] != 1 or x.shape[-1] != in_features:
        return None
    if bias is not None:
        if bias.dtype != bf16 or not bias.is_cpu or bias.shape != (out_features,):
            return None
        bias = bias.contiguous()
    rows = x if x.ndim == 2 else x.reshape(-1, in_features)
    x_stride = rows.stride()
    if x_stride[1] != 1:
        rows = rows.contiguous()
        x_stride = rows.stride()
    tokens = rows.shape[0]
    out = torch.empty((tokens, out_features), dtype=bf16)
    rc = fn(rows.data_ptr(), x_stride[0], weight.data_ptr(), w_stride[0], None if bias is None else bias.data_ptr(),
            out.data_ptr(), tokens, in_features, out_features, torch.get_num_threads())
    if rc != 0:
        return None
    return out if x.ndim == 2 else out.view(*x.shape[:-1], out_features)


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in), bias (out,) bf16 on CPU
    through the AMX kernel, reading `weight` where it lies (its rows may be strided). None when
    the kernel does not take these inputs (no AMX, another dtype or device, in < 32 and odd);
    the caller then takes another path. No autograd: call it only under no-grad."""
    return _plain_linear(_kernel("amx_linear"), x, weight, bias)


def avx512_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`amx_linear`'s contract through AVX512-BF16 dot products (any in_features); None where
    the CPU lacks AVX512-BF16."""
    return _plain_linear(_kernel("avx512_linear"), x, weight, bias)


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packing the weights is worth its memory here: where oneDNN packs and the AMX
    kernel, which reads the weights in place, is not available (bench/RESULTS.md compares them:
    1.2-2x faster at decode sizes, 0.8-1.3x at 512-token prefill)."""
    return prepack_available(device, dtype) and not amx_available(device, dtype)


def pack_weight(weight: torch.Tensor, batch_size_hint: int = 128) -> torch.Tensor:
    """weight (out, in) -> an opaque oneDNN tensor for `packed_linear` (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same as F.linear(x, weight, bias) for x (T, in) with the weight packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias). Without gradients: from the packed copy when there is one,
    else through the first plain-weight kernel that takes these inputs (AMX, then AVX512-BF16;
    each is None at once where its CPU feature is absent); with gradients: F.linear."""
    if not torch.is_grad_enabled():
        if packed is not None:
            return packed_linear(x, packed, bias)
        out = amx_linear(x, weight, bias)
        if out is None:
            out = avx512_linear(x, weight, bias)
        if out is not None:
            return out
    return F.linear(x, weight, bias)
