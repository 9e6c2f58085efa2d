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
mutated, except the pool of the `conv1d_decode*` steps.

Forms: `naive_causal_conv1d` (the reference loop), `causal_conv1d` (one batched conv, also
under autograd) and `causal_conv1d_cpu` (one C pass) for prefill; `causal_conv1d_update` for
a decode step on gathered states, and `conv1d_decode(_cpu)` for one on an engine's state pool,
which it updates IN PLACE.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_ext

_STEP_ARGS = (cpu_ext.P,) * 5 + (cpu_ext.I64,) * 4 + (cpu_ext.INT,) * 3
_PREFILL_ARGS = (cpu_ext.P,) * 6 + (cpu_ext.I64,) * 4 + (cpu_ext.INT,) * 3


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


def causal_conv1d(
    x: Tensor, weight: Tensor, cu_seqlens: Tensor, initial_state: Tensor | None, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """Prefill: ONE grouped F.conv1d over all sequences, each preceded by its state:

        xpad = [state_0, x_0, state_1, x_1, ...]    (T + N(K-1), C)

    Output j of the convolution covers xpad[j : j + K], so token i of sequence s reads output
    start_s + s(K-1) + i, and outputs straddling two sequences are never read.

    x (T, C); weight (C, K); initial_state (N, C, K-1) or None.
    Returns (out (T, C), final_state (N, C, K-1)).
    """
    channels, kernel_width = weight.shape
    history = kernel_width - 1
    num_tokens = x.shape[0]
    num_seqs = cu_seqlens.numel() - 1
    states = _start_states(initial_state, num_seqs, x, kernel_width)  # (N, C, K-1)
    if num_tokens == 0:
        return x.new_empty(x.shape), states.to(x.dtype)
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lengths)  # (T,)
    token_row = torch.arange(num_tokens, device=x.device) + (seq_of_token + 1) * history  # in xpad
    state_row = (cu[:-1] + torch.arange(num_seqs, device=x.device) * history)[:, None] + torch.arange(
        history, device=x.device
    )  # (N, K-1) rows of xpad holding each sequence's state

    xpad = x.new_empty(num_tokens + num_seqs * history, channels, dtype=torch.float32)
    xpad = xpad.index_put((token_row,), x.float()).index_put(
        (state_row.flatten(),), states.transpose(1, 2).reshape(-1, channels)
    )
    kernel = weight.float()[:, None, :]  # (C, 1, K): one input channel per group
    conv = F.conv1d(xpad.T[None], kernel, groups=channels)[0].T  # (T + N(K-1) - K + 1, C)
    out = conv[token_row - history]
    # After sequence s, its last K-1 rows of xpad (state rows included when it is shorter).
    final_states = xpad[state_row + lengths[:, None]].transpose(1, 2)  # (N, C, K-1)
    return _activate(out, activation).to(x.dtype), final_states.to(x.dtype)


def causal_conv1d_cpu(
    x: Tensor, weight: Tensor, cu_seqlens: Tensor, initial_state: Tensor | None, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """`causal_conv1d` in one C pass (kernels/csrc/linear_attention.c); the torch form under
    autograd or for other layouts/dtypes. x may be a row-strided view (of a fused projection)."""
    ok = cpu_ext.fast_path_ok(x, weight, initial_state) and cu_seqlens.device.type == "cpu"
    fn = cpu_ext.function("linear_attention", "conv1d_prefill", _PREFILL_ARGS) if ok else None
    channels, kernel_width = weight.shape
    num_seqs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64).contiguous()
    if (
        fn is None
        or activation not in (None, "silu")
        or x.dtype != weight.dtype
        or x.shape[1] != channels or x.stride(1) != 1
        or not cpu_ext.packed_bounds_ok(cu.tolist(), x.shape[0])
        or (initial_state is not None and (initial_state.dtype != x.dtype or initial_state.shape != (num_seqs, channels, kernel_width - 1)))
    ):
        return causal_conv1d(x, weight, cu_seqlens, initial_state, activation)
    state = None if initial_state is None else initial_state.contiguous()
    wt = weight.T.contiguous()  # (K, C): a few KB
    out = x.new_empty(x.shape[0], channels)
    final = x.new_empty(num_seqs, channels, kernel_width - 1)
    fn(x.data_ptr(), wt.data_ptr(), cpu_ext.ptr(state), cu.data_ptr(), out.data_ptr(), final.data_ptr(), num_seqs,
       channels, kernel_width, x.stride(0), int(activation == "silu"), int(x.dtype == torch.bfloat16),
       torch.get_num_threads())
    return out, final


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


def conv1d_decode(x: Tensor, weight: Tensor, pool: Tensor, slots: Tensor, activation: str | None = "silu") -> Tensor:
    """A decode step whose states live in rows `slots` (N,) of `pool` (num_slots, C, K-1):
    `causal_conv1d_update` on the gathered rows, the new states written back. Returns out (N, C)."""
    out, pool[slots] = causal_conv1d_update(x, weight, pool[slots], activation)
    return out


def conv1d_decode_cpu(x: Tensor, weight: Tensor, pool: Tensor, slots: Tensor, activation: str | None = "silu") -> Tensor:
    """`conv1d_decode` in one C pass (kernels/csrc/linear_attention.c), each state updated in
    place in the pool; the torch form under autograd or for other layouts/dtypes. x may be a
    row-strided view (of a fused projection)."""
    ok = cpu_ext.fast_path_ok(x, weight, pool) and slots.device.type == "cpu"
    fn = cpu_ext.function("linear_attention", "conv1d_step", _STEP_ARGS) if ok else None
    channels, kernel_width = weight.shape
    if (
        fn is None
        or activation not in (None, "silu")
        or not (x.dtype == weight.dtype == pool.dtype)
        or x.shape[1] != channels or x.stride(1) != 1
        or not weight.is_contiguous() or not pool.is_contiguous()
        or pool.shape[1:] != (channels, kernel_width - 1)
        or slots.shape != (x.shape[0],) or slots.dtype != torch.int64 or not slots.is_contiguous()
    ):
        return conv1d_decode(x, weight, pool, slots, activation)
    cpu_ext.check_slots(slots, pool.shape[0])
    out = x.new_empty(x.shape[0], channels)
    fn(x.data_ptr(), weight.data_ptr(), pool.data_ptr(), slots.data_ptr(), out.data_ptr(), x.shape[0], channels,
       kernel_width, x.stride(0), int(activation == "silu"), int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out


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
