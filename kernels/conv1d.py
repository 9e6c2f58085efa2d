"""Causal depthwise conv1d with a carried state (the short conv in front of Gated DeltaNet).

Each channel c has its own kernel weight[c] of width K. For a sequence x prefixed by the K-1
inputs that preceded it (its state; zeros for a fresh sequence):

    xpad = [state[:, 0], ..., state[:, K-2], x[0], x[1], ...]          # per channel, oldest first
    out[t, c] = act( sum_j weight[c, j] * xpad[t + j, c] )             # weight[:, K-1] hits x[t]

    K = 4:   xpad:   s0  s1  s2  x0  x1  x2  ...
             out[0] = w0*s0 + w1*s1 + w2*s2 + w3*x0
             out[1] =         w0*s1 + w1*s2 + w2*x0 + w3*x1
             final state = last K-1 entries of xpad (works when len(x) < K-1)

This is transformers' Qwen3.5 `causal_conv1d_fn` / `causal_conv1d_update` (no bias). One
difference in bookkeeping: transformers' cache keeps the last K inputs, the current token
included; here a state is the K-1 inputs *before* the next token, which is all the maths reads.

Conventions: x (T, C) packs N sequences along dim 0, split by `cu_seqlens` (N+1,) int64;
weight (C, K); states (N, C, K-1). Arithmetic is float32 whatever the input dtypes (the
activation is applied before the single rounding); outputs are in x.dtype, and states are in
x.dtype too (they hold raw inputs, so nothing is lost). Results are fresh tensors; no input is
mutated.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _activate(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"unsupported activation {activation!r}; expected 'silu' or None")


def _start_states(initial_state: Tensor | None, num_seqs: int, x: Tensor, kernel_width: int) -> Tensor:
    """float32 (N, C, K-1) states to start from (zeros when None)."""
    if initial_state is None:
        return x.new_zeros(num_seqs, x.shape[1], kernel_width - 1, dtype=torch.float32)
    return initial_state.to(device=x.device, dtype=torch.float32)


def _last_inputs(xpad: Tensor, kernel_width: int) -> Tensor:
    """The last K-1 entries along the last dim (an empty slice when K == 1)."""
    return xpad[..., xpad.shape[-1] - (kernel_width - 1) :]


def causal_conv1d(
    x: Tensor, weight: Tensor, cu_seqlens: Tensor, initial_state: Tensor | None, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """Prefill: one grouped F.conv1d per sequence over [state, sequence].

    x (T, C); weight (C, K); initial_state (N, C, K-1) or None.
    Returns (out (T, C), final_state (N, C, K-1)).
    """
    channels, kernel_width = weight.shape
    bounds = cu_seqlens.tolist()
    states = _start_states(initial_state, len(bounds) - 1, x, kernel_width)  # (N, C, K-1)
    kernel = weight.float()[:, None, :]  # (C, 1, K): one input channel per group
    out = x.new_empty(x.shape, dtype=torch.float32)  # (T, C)
    final_states = torch.empty_like(states)

    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        xpad = torch.cat([states[seq], x[start:end].float().T], dim=-1)  # (C, K-1 + L)
        out[start:end] = F.conv1d(xpad[None], kernel, groups=channels)[0].T  # (L, C)
        final_states[seq] = _last_inputs(xpad, kernel_width)

    return _activate(out, activation).to(x.dtype), final_states.to(x.dtype)


def causal_conv1d_update(
    x: Tensor, weight: Tensor, state: Tensor, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """Decode: one token for each of N sequences.

    x (N, C); weight (C, K); state (N, C, K-1). Returns (out (N, C), new_state (N, C, K-1));
    `state` is not mutated, the caller writes new_state back into its cache.
    """
    window = torch.cat([state.float(), x.float()[:, :, None]], dim=-1)  # (N, C, K)
    out = (window * weight.float()).sum(dim=-1)  # (N, C)
    return _activate(out, activation).to(x.dtype), window[:, :, 1:].to(x.dtype)


def naive_causal_conv1d(
    x: Tensor, weight: Tensor, cu_seqlens: Tensor, initial_state: Tensor | None, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """Reference: slide a window of the last K inputs along each sequence, token by token."""
    _, kernel_width = weight.shape
    bounds = cu_seqlens.tolist()
    states = _start_states(initial_state, len(bounds) - 1, x, kernel_width)  # (N, C, K-1)
    weight = weight.float()  # (C, K)
    out = x.new_empty(x.shape, dtype=torch.float32)  # (T, C)
    final_states = torch.empty_like(states)

    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        history = states[seq]  # (C, K-1), oldest first
        for t in range(start, end):
            window = torch.cat([history, x[t].float()[:, None]], dim=-1)  # (C, K)
            out[t] = (window * weight).sum(dim=-1)
            history = window[:, 1:]
        final_states[seq] = history

    return _activate(out, activation).to(x.dtype), final_states.to(x.dtype)
