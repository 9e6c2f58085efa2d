"""Map transformers parameter names onto CausalLM's (fused) parameters.

    transformers                                   CausalLM
    model.embed_tokens.weight                      embed_tokens
    model.layers.i.self_attn.{q,k,v}_proj.*        layers.i.self_attn.qkv_proj parts q, k, v
      (Qwen3.5 q_proj rows interleave per head [query | gate]: split into parts q and gate)
    model.layers.i.mlp.{gate,up}_proj.weight       layers.i.mlp.gate_up_proj parts 0, 1
    model.layers.i.linear_attn.in_proj_{qkv,z,b,a} layers.i.linear_attn.in_proj parts 0..3
    model.layers.i.linear_attn.conv1d.weight       layers.i.linear_attn.conv_weight (C, 1, K) -> (C, K)
    *layernorm / norm / q_norm / k_norm            RMSNorm weights (+1 for zero-centred norms)

Published Qwen3.5 checkpoints are multimodal: their language weights live under
`model.language_model.`; the vision tower (`model.visual.`) and the multi-token-prediction
head (`mtp.`) are skipped, and counted in the log line.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger(__name__)

_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIPPED = re.compile(r"^(model\.visual\.|visual\.|mtp\.|model\.mtp\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class WeightMapper:
    def __init__(self, model: nn.Module):
        self.model = model
        self.cfg = model.config
        self.params = dict(model.named_parameters())
        # Every (parameter, part) that must be filled; parts are stacked rows of a fused Linear.
        self.pending: set[tuple[str, int | None]] = set()
        for name, module in model.named_modules():
            if hasattr(module, "out_sizes"):
                self.pending.update((f"{name}.weight", i) for i in range(len(module.out_sizes)))
                if module.bias is not None:
                    self.pending.update((f"{name}.bias", i) for i in range(len(module.out_sizes)))
        fused = {p for p, _ in self.pending}
        self.pending.update((n, None) for n in self.params if n not in fused)
        self.skipped = 0

    def load(self, hf_name: str, tensor: torch.Tensor) -> None:
        if _SKIPPED.match(hf_name) or hf_name.endswith("rotary_emb.inv_freq"):
            self.skipped += 1
            return
        if hf_name == "lm_head.weight":
            if self.cfg.tie_word_embeddings:
                return
            self._fill("lm_head.weight", 0, tensor)
            return
        name = _strip_prefix(hf_name)
        if name == "embed_tokens.weight":
            self._fill("embed_tokens", None, tensor)
        elif name == "norm.weight":
            self._fill("norm.weight", None, self._norm(tensor))
        else:
            m = _LAYER.match(name)
            if m is None:
                raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
            self._load_layer(int(m.group(1)), m.group(2), tensor, hf_name)

    def _load_layer(self, i: int, rest: str, t: torch.Tensor, hf_name: str) -> None:
        p = f"layers.{i}"
        attn_parts = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        if self.cfg.attn_output_gate:
            attn_parts = {"q_proj": 0, "k_proj": 2, "v_proj": 3}
        head, _, leaf = rest.rpartition(".")
        if head in ("input_layernorm", "post_attention_layernorm"):
            self._fill(f"{p}.{head}.weight", None, self._norm(t))
        elif head.startswith("self_attn."):
            proj = head.removeprefix("self_attn.")
            if proj in attn_parts:
                if proj == "q_proj" and self.cfg.attn_output_gate:
                    query, gate = self._split_query_gate(t)
                    self._fill(f"{p}.self_attn.qkv_proj.{leaf}", 0, query)
                    self._fill(f"{p}.self_attn.qkv_proj.{leaf}", 1, gate)
                else:
                    self._fill(f"{p}.self_attn.qkv_proj.{leaf}", attn_parts[proj], t)
            elif proj == "o_proj":
                self._fill(f"{p}.self_attn.o_proj.{leaf}", 0, t)
            elif proj in ("q_norm", "k_norm"):
                self._fill(f"{p}.self_attn.{proj}.weight", None, self._norm(t))
            else:
                raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
        elif head in ("mlp.gate_proj", "mlp.up_proj"):
            self._fill(f"{p}.mlp.gate_up_proj.{leaf}", 0 if head == "mlp.gate_proj" else 1, t)
        elif head == "mlp.down_proj":
            self._fill(f"{p}.mlp.down_proj.{leaf}", 0, t)
        elif head.startswith("linear_attn") or rest.startswith("linear_attn."):
            self._load_linear_attn(p, rest.removeprefix("linear_attn."), t, hf_name)
        else:
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")

    def _load_linear_attn(self, p: str, rest: str, t: torch.Tensor, hf_name: str) -> None:
        in_parts = {"in_proj_qkv.weight": 0, "in_proj_z.weight": 1, "in_proj_b.weight": 2, "in_proj_a.weight": 3}
        if rest in in_parts:
            self._fill(f"{p}.linear_attn.in_proj.weight", in_parts[rest], t)
        elif rest == "conv1d.weight":
            self._fill(f"{p}.linear_attn.conv_weight", None, t.reshape(t.shape[0], t.shape[-1]))
        elif rest in ("dt_bias", "A_log"):
            self._fill(f"{p}.linear_attn.{rest}", None, t)
        elif rest == "norm.weight":
            self._fill(f"{p}.linear_attn.norm_weight", None, t)
        elif rest == "out_proj.weight":
            self._fill(f"{p}.linear_attn.out_proj.weight", 0, t)
        else:
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")

    def _split_query_gate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3.5 q_proj rows are per head [query (D) | gate (D)]; split into two stacks."""
        heads, d = self.cfg.num_attention_heads, self.cfg.head_dim
        per_head = t.reshape(heads, 2, d, *t.shape[1:])
        return per_head[:, 0].reshape(heads * d, *t.shape[1:]), per_head[:, 1].reshape(heads * d, *t.shape[1:])

    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return t + 1.0 if self.cfg.zero_centered_norm else t

    def _fill(self, param_name: str, part: int | None, t: torch.Tensor) -> None:
        key = (param_name, part)
        if key not in self.pending:
            if param_name not in self.params:
                raise ValueError(f"no parameter {param_name!r} in this model")
            raise ValueError(f"parameter {param_name!r} (part {part}) given twice")
        param = self.params[param_name]
        if part is None:
            target = param.data
        else:
            module = self.model.get_submodule(param_name.rsplit(".", 1)[0])
            target = param.data[module.part_rows(part)]
        if tuple(target.shape) != tuple(t.shape):
            raise ValueError(f"{param_name} part {part}: checkpoint shape {tuple(t.shape)} != {tuple(target.shape)}")
        target.copy_(t)
        self.pending.discard(key)

    def finish(self) -> None:
        if self.pending:
            missing = sorted(f"{n}[{p}]" if p is not None else n for n, p in self.pending)
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
        if self.skipped:
            log.info("loaded the language model; skipped %d tensors (vision tower / MTP head)", self.skipped)


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
