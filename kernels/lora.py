"""Multi-adapter LoRA for a flat batch: every row may use a different adapter slot (or none).

Slot buffers of one projection (`W` is (out, in)):

    A: (slots, R, in)     R = the ranks of every LoRA site on this projection, side by side
    B: (slots, out, R)    each site's B (scale folded in) sits in its own R-columns and its own
                          output rows, zeros elsewhere, so one (x A^T) B^T per slot covers all
                          the sites of a fused projection (q, k and v of qkv_proj, say)

    y[rows of slot s] += (x[rows] @ A[s]^T) @ B[s]^T

`lora_delta_reference` loops over rows (the definition); `lora_delta` groups rows by slot
(one shrink and one expand matmul per active slot per projection).
"""

from __future__ import annotations

import torch


def lora_delta_reference(
    x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slots: list[int | None]
) -> torch.Tensor:
    """x (T, in), out (T, out); a (S, R, in), b (S, out, R); row_slots: slot per row or None.
    Returns out + the LoRA deltas (a new tensor)."""
    out = out.clone()
    for t, slot in enumerate(row_slots):
        if slot is not None:
            out[t] += ((x[t].float() @ a[slot].float().T) @ b[slot].float().T).to(out.dtype)
    return out


def lora_delta(
    x: torch.Tensor,
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    groups: list[tuple[int, torch.Tensor | None]],
) -> torch.Tensor:
    """Same contract with rows grouped by slot: `groups` = [(slot, row indices or None for
    all rows)]. Adds into `out` in place (no autograd: serving only) and returns it."""
    for slot, rows in groups:
        xs = x if rows is None else x.index_select(0, rows)
        delta = (xs @ a[slot].T) @ b[slot].T
        if rows is None:
            out += delta
        else:
            out.index_add_(0, rows, delta)
    return out
