"""Building blocks shared by every architecture: fused linear projections, RMSNorm, the MLP and
the rotary embedding table."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.dispatch import Kernels
from kernels.linear import linear, pack_weight
from kernels.norm import rms_norm
from kernels.rotary import cos_sin_cache
from kiln_ray.model.config import RopeConfig


class Linear(nn.Module):
    """y = x W^T (+ b), where W may be several projections stacked along its output rows.

    `out_sizes` names the stacked parts in order (e.g. q, k, v), so the loader can fill each
    part from its own checkpoint tensor and LoRA can add a delta to each part separately.
    Base weights never require grad. No-grad forwards on CPU bf16 take a fast path
    (kernels/linear.py): the AMX kernel on the weight itself where the CPU has AMX, else, after
    `prepack`, a oneDNN-packed copy; the weight stays the source of truth.
    """

    def __init__(self, in_features: int, out_sizes: tuple[int, ...], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_sizes = out_sizes
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(out_sizes), dtype=dtype), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # see `prepack`
        self.path = ""  # this module's name in the model, set by CausalLM (LoRA looks it up)

    def prepack(self) -> None:
        """Keep a oneDNN-packed copy of the weight for no-grad forwards (CPU bf16; worth its
        memory only without AMX: see `kernels.linear.prepack_wanted`)."""
        self.packed = pack_weight(self.weight)

    def part_rows(self, part: int) -> slice:
        start = sum(self.out_sizes[:part])
        return slice(start, start + self.out_sizes[part])

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora`: anything with `apply(path, x, out) -> out` (model/lora.py), or None."""
        out = linear(x, self.weight, self.bias, self.packed)
        return out if lora is None else lora.apply(self.path, x, out)


class RMSNorm(nn.Module):
    """Weight kept in float32 (see kernels/norm.py); zero-centred norms are stored as 1 + w."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, kernels: Kernels, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = Linear(hidden_size, (intermediate_size, intermediate_size), bias, dtype)
        self.down_proj = Linear(intermediate_size, (hidden_size,), bias, dtype)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x, lora)), lora)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `rotary_dim` dims of each head (partial rotary leaves the
    rest), from a float32 cos/sin table of `max_positions` rows built once."""

    def __init__(self, rope: RopeConfig, max_positions: int):
        super().__init__()
        self.rotary_dim = rope.rotary_dim
        self.register_buffer("cos_sin", cos_sin_cache(_inv_freq(rope), max_positions), persistent=False)


def _inv_freq(rope: RopeConfig) -> torch.Tensor:
    dim = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.scaling_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling_type == "llama3":
        # Llama 3.1: long wavelengths are scaled by `factor`, short ones kept, a smooth ramp between.
        old_len = rope.original_max_position or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq
