"""SwiGLU's activation: silu(gate) * up over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_ext

_SILU_MUL_ARGS = (cpu_ext.P, cpu_ext.P, cpu_ext.I64, cpu_ext.I64, cpu_ext.INT, cpu_ext.INT)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) -> silu(gate_up[:, :I]) * gate_up[:, I:] (T, I). The reference."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """Same, in one C pass (float32 math, one rounding); the reference under autograd."""
    fn = cpu_ext.function("cpu_ops", "silu_mul", _SILU_MUL_ARGS) if cpu_ext.fast_path_ok(gate_up) else None
    if fn is None or gate_up.dim() != 2 or not gate_up.is_contiguous():
        return silu_and_mul(gate_up)
    rows, width = gate_up.shape
    out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
    fn(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return out
