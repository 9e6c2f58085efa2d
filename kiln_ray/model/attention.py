"""Full (softmax) attention layer: GQA, RoPE (optionally partial), optional per-head q/k RMSNorm,
optional sigmoid output gate (Qwen3.5)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.dispatch import Kernels
from kiln_ray.model.config import ModelConfig
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.layers import Linear, RMSNorm


class Attention(nn.Module):
    """qkv_proj stacks [q; gate (if gated); k; v] rows; `cache_index` is this layer's ordinal
    among full-attention layers (which KV cache pair it owns)."""

    def __init__(self, cfg: ModelConfig, cache_index: int, kernels: Kernels, dtype: torch.dtype):
        super().__init__()
        self.cache_index = cache_index
        self.kernels = kernels
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.gated = cfg.attn_output_gate
        parts = (q_size, q_size, kv_size, kv_size) if self.gated else (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, parts, cfg.attention_bias, dtype)
        self.o_proj = Linear(q_size, (cfg.hidden_size,), cfg.o_proj_bias, dtype)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        parts = self.qkv_proj(x, ctx.lora).split(self.qkv_proj.out_sizes, dim=-1)
        if self.gated:
            q, gate, k, v = parts
        else:
            (q, k, v), gate = parts, None
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.kernels.rotary(q, k, positions, rope_cache)

        if ctx.serving:
            k_cache, v_cache = ctx.caches.kv[self.cache_index]
            self.kernels.write_kv(k, v, k_cache, v_cache, ctx.attention.slot_mapping)
            out = self.kernels.paged_attention(q, k_cache, v_cache, ctx.attention, self.scale)
        else:
            out = self.kernels.varlen_attention(q, k, v, ctx.cu_seqlens, self.scale)

        out = out.reshape(num_tokens, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out, ctx.lora)
