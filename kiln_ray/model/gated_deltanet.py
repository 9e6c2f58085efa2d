"""Gated DeltaNet ("linear_attention" layers of Qwen3.5).

Per token: project to [q k v | z | b | a]; run q, k, v through a causal depthwise conv (its
last K-1 inputs are the conv state); L2-normalise q and k; decay g = -exp(A_log) *
softplus(a + dt_bias) and write strength beta = sigmoid(b) drive the delta-rule recurrence
over a (Dk, Dv) state per value head; the output is RMS-normalised, gated by silu(z), and
projected back.

In serving mode each sequence owns a state slot (conv + recurrent state, zeroed when the slot
is handed out). Decodes and prefill chunks run from the slot's state and leave the new state
in it (`Kernels.conv1d_decode`, `gated_delta_decode`, `gated_delta_prefill`: on CPU, C kernels
updating the pools in place). Training (no slots) takes the chunked, differentiable forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import Kernels
from kernels.norm import gated_rms_norm
from kiln_ray.model.config import ModelConfig
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.layers import Linear


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32 (as flash-linear-attention does)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """`state_index` is this layer's ordinal among linear-attention layers (which state pool it owns)."""

    def __init__(self, cfg: ModelConfig, state_index: int, kernels: Kernels, dtype: torch.dtype):
        super().__init__()
        self.state_index = state_index
        self.kernels = kernels
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.head_k_dim = cfg.linear_key_head_dim
        self.head_v_dim = cfg.linear_value_head_dim
        self.key_dim = cfg.linear_key_dim
        self.value_dim = cfg.linear_value_dim
        self.conv_dim = cfg.linear_conv_dim
        self.eps = cfg.rms_norm_eps
        self.in_proj = Linear(
            cfg.hidden_size, (self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads), False, dtype
        )
        self.conv_weight = nn.Parameter(
            torch.empty(self.conv_dim, cfg.linear_conv_kernel_dim, dtype=dtype), requires_grad=False
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads, dtype=torch.float32), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads, dtype=torch.float32), requires_grad=False)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim, dtype=torch.float32), requires_grad=False)
        self.out_proj = Linear(self.value_dim, (cfg.hidden_size,), False, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        mixed_qkv, z, b, a = self.in_proj(x, ctx.lora).split(self.in_proj.out_sizes, dim=-1)

        mixed_qkv = self._conv(mixed_qkv, ctx)  # (T, conv_dim)
        q, k, v = mixed_qkv.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        q = l2_normalize(q.reshape(num_tokens, self.num_k_heads, self.head_k_dim))
        k = l2_normalize(k.reshape(num_tokens, self.num_k_heads, self.head_k_dim))
        v = v.reshape(num_tokens, self.num_v_heads, self.head_v_dim)
        beta = torch.sigmoid(b).float()  # (T, Hv)
        decay = -self.A_log.exp() * F.softplus(a.float() + self.dt_bias)  # (T, Hv), log-space, <= 0

        out = self._delta_rule(q, k, v, decay, beta, ctx)  # (T, Hv, Dv)
        out = gated_rms_norm(out, z.reshape(num_tokens, self.num_v_heads, self.head_v_dim), self.norm_weight, self.eps)
        return self.out_proj(out.reshape(num_tokens, self.value_dim), ctx.lora)

    def _conv(self, mixed_qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        k = self.kernels
        cu = ctx.cu_seqlens_t
        if not ctx.serving:
            out, _ = k.causal_conv1d(mixed_qkv, self.conv_weight, cu, None)
            return out
        pool = ctx.caches.conv[self.state_index]  # (slots, conv_dim, K-1)
        slots, nd = ctx.states.slots, ctx.states.num_decodes
        out = torch.empty_like(mixed_qkv)
        if nd:
            out[:nd] = k.conv1d_decode(mixed_qkv[:nd], self.conv_weight, pool, slots[:nd])
        if nd < len(ctx.cu_seqlens) - 1:
            prefill_cu = cu[nd:] - cu[nd]
            out[nd:], pool[slots[nd:]] = k.causal_conv1d(
                mixed_qkv[nd:], self.conv_weight, prefill_cu, pool[slots[nd:]]
            )
        return out

    def _delta_rule(self, q, k, v, decay, beta, ctx: ForwardContext) -> torch.Tensor:
        kern = self.kernels
        scale = self.head_k_dim**-0.5
        cu = ctx.cu_seqlens_t
        if not ctx.serving:
            out, _ = kern.chunk_gated_delta_rule(q, k, v, decay, beta, cu, None, scale)
            return out
        pool = ctx.caches.recurrent[self.state_index]  # (slots, Hv, Dk, Dv) float32
        slots, nd = ctx.states.slots, ctx.states.num_decodes
        out = torch.empty_like(v)
        if nd:
            out[:nd] = kern.gated_delta_decode(q[:nd], k[:nd], v[:nd], decay[:nd], beta[:nd], pool, slots[:nd], scale)
        if nd < len(ctx.cu_seqlens) - 1:
            prefill_cu = cu[nd:] - cu[nd]
            out[nd:] = kern.gated_delta_prefill(
                q[nd:], k[nd:], v[nd:], decay[nd:], beta[nd:], prefill_cu, pool, slots[nd:], scale
            )
        return out
