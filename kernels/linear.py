"""Dense projections: F.linear (the reference) and oneDNN's prepacked bf16 matmul on CPU.

On CPU, `torch.ops.mkldnn._linear_pointwise` with a weight reordered once into oneDNN's
blocked layout runs the bf16 projections of a small model ~1.3-2x faster than F.linear at
1-64 rows (bench/RESULTS.md). The packed copy is opaque, has no autograd, and costs the
weight's size again, so it is used only under no-grad and only when asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_weight(weight: torch.Tensor, batch_size_hint: int = 128) -> torch.Tensor:
    """weight (out, in) -> an opaque oneDNN tensor for `packed_linear` (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same as F.linear(x, weight, bias) for x (T, in) with the weight packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """The packed path when a packed weight exists and no gradient is wanted, else F.linear."""
    if packed is not None and not torch.is_grad_enabled():
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)
