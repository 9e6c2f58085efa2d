"""ForwardContext: everything one forward pass needs besides token ids and positions.

Two modes share the same modules:

    serving   attention + states set: paged KV cache and state slots, a flat varlen batch
              with decodes (one token per sequence) first, then prefill chunks
    training  attention = states = None: dense packed sequences, causal within each,
              every sequence starts from an empty state, nothing is cached
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.attention import AttentionMetadata


@dataclass
class StateMetadata:
    """Which state slot each sequence of the batch reads and updates (linear-attention layers).

    A slot is zeroed when it is handed to a request, so "no previous state" needs no flag.
    """

    slots: torch.Tensor  # (N,) int64
    num_decodes: int


@dataclass
class LayerCaches:
    """Long-lived cache tensors, indexed by a layer's ordinal among layers of its kind."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # full attention
    conv: list[torch.Tensor] = field(default_factory=list)  # (slots, conv_dim, K - 1)
    recurrent: list[torch.Tensor] = field(default_factory=list)  # (slots, Hv, Dk, Dv) float32


@dataclass
class ForwardContext:
    """Valid for one forward pass; the runner builds a new one each step."""

    cu_seqlens: list[int]  # host, N + 1 offsets of the sequences in the flat batch
    attention: AttentionMetadata | None = None
    states: StateMetadata | None = None
    caches: LayerCaches | None = None
    lora: Any = None  # LoraBatch (serving) or TrainableLora (training): apply(path, x, out) -> out
    checkpoint_layers: bool = False  # training: recompute each layer in backward (less memory)
    cu_seqlens_t: torch.Tensor = field(init=False)  # the same offsets as an int64 tensor

    def __post_init__(self) -> None:
        self.cu_seqlens_t = torch.tensor(self.cu_seqlens, dtype=torch.int64)

    @property
    def serving(self) -> bool:
        return self.caches is not None

    @classmethod
    def dense(cls, seq_lens: list[int], lora: Any = None) -> ForwardContext:
        """Training mode: packed sequences of the given lengths, no cache."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return cls(cu_seqlens=cu, lora=lora)
