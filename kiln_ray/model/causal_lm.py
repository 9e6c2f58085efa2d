"""CausalLM: one decoder-only implementation for every supported architecture.

Each layer is [RMSNorm -> token mixer -> residual -> RMSNorm -> SwiGLU MLP -> residual] where
the token mixer is full attention or Gated DeltaNet by the checkpoint's `layer_types`.
The model maps a flat batch of tokens to hidden states; `compute_logits` projects only the
rows the caller wants to sample, so prefill chunks never build [T, vocab] logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.dispatch import Kernels
from kernels.linear import linear, pack_weight
from kiln_ray.model.attention import Attention
from kiln_ray.model.config import ModelConfig
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.gated_deltanet import GatedDeltaNet
from kiln_ray.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding

log = logging.getLogger(__name__)

MAX_POSITIONS = 32768  # rows of the rotary table; also the engine's context cap


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, kind_index: int, kernels: Kernels, dtype: torch.dtype):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer_type == "full_attention":
            self.self_attn = Attention(cfg, kind_index, kernels, dtype)
        else:
            self.linear_attn = GatedDeltaNet(cfg, kind_index, kernels, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, kernels, dtype, cfg.mlp_bias)
        self.kernels = kernels

    def forward(
        self, x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x, residual). The residual stream is float32 and carried
        un-added: each block's output x is added to it by the norm that follows (fused, and
        in place on CPU). x is None before the first layer."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        dtype = self.mlp.gate_up_proj.weight.dtype
        x, residual = self.kernels.add_rms_norm(x, residual, norm1.weight, norm1.eps, dtype)
        if self.layer_type == "full_attention":
            x = self.self_attn(x, positions, rope, ctx)
        else:
            x = self.linear_attn(x, ctx)
        x, residual = self.kernels.add_rms_norm(x, residual, norm2.weight, norm2.eps, dtype)
        return self.mlp(x, ctx.lora), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        counters = {"full_attention": 0, "linear_attention": 0}
        layers = []
        for layer_type in cfg.layer_types:
            layers.append(DecoderLayer(cfg, layer_type, counters[layer_type], kernels, dtype))
            counters[layer_type] += 1
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, (cfg.vocab_size,), False, dtype)
        self.rotary = RotaryEmbedding(cfg.rope, min(cfg.max_position_embeddings, MAX_POSITIONS))
        self.kernels = kernels
        self.packed_tied_head: torch.Tensor | None = None  # tied embeddings as the output head
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                module.path = name

    def prepack(self) -> None:
        """Pack every projection (and the output head) for fast no-grad forwards on CPU bf16;
        costs the weights' size again in memory. The engine does it only where that is faster
        than the plain weights (`kernels.linear.prepack_wanted`: no AMX)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        if self.lm_head is None:
            self.packed_tied_head = pack_weight(self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, hidden) after the last norm.
        Raises ValueError for a position beyond the rotary table (the model's context)."""
        if positions.numel() and int(positions.max()) >= self.rotary.cos_sin.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond this model's {self.rotary.cos_sin.shape[0]} positions")
        x, residual = None, F.embedding(input_ids, self.embed_tokens).float()
        for layer in self.layers:
            if ctx.checkpoint_layers:
                x, residual = checkpoint(layer, x, residual, positions, self.rotary.cos_sin, ctx, use_reentrant=False)
            else:
                x, residual = layer(x, residual, positions, self.rotary.cos_sin, ctx)
        x, _ = self.kernels.add_rms_norm(x, residual, self.norm.weight, self.norm.eps, self.dtype)
        return x

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden (N, hidden) -> logits (N, vocab), in float32 unless `upcast` is False (then
        in the model's dtype). A tied head is the embedding table itself (through the AMX
        kernel or its packed copy, as any projection)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            logits = linear(hidden, self.embed_tokens, None, self.packed_tied_head)
        return logits.float() if upcast else logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from (transformers name, tensor) pairs; fuses q/k/v, gate/up and
        the Gated DeltaNet input projections. Raises if a parameter is left unfilled."""
        from kiln_ray.model.weight_map import WeightMapper

        mapper = WeightMapper(self)
        for name, tensor in weights:
            mapper.load(name, tensor)
        mapper.finish()
