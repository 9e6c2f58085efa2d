"""The gated delta rule of Gated DeltaNet (the "linear_attention" layers of Qwen3-Next / Qwen3.5).

Each value head keeps a state S of shape (Dk, Dv): an associative memory from keys to values.
Per token t, with log-decay g_t <= 0 and write strength beta_t in (0, 1):

    S      = exp(g_t) * S                    # forget a little
    kv_mem = k_t^T S                         # (Dv,) what the memory recalls for k_t
    delta  = beta_t * (v_t - kv_mem)         # (Dv,) the correction (the "delta rule")
    S      = S + outer(k_t, delta)           # write the correction under k_t
    o_t    = (scale * q_t)^T S               # (Dv,) read with the query

Three forms with one contract:

- `naive_gated_delta_rule`: the loop above, token by token (the reference).
- `chunk_gated_delta_rule`: the chunked WY / UT-transform form, for prefill.
- `recurrent_gated_delta_rule`: one step for one token of each of N sequences, for decode.

Shared conventions (flat varlen batches):

- q, k: (T, Hk, Dk), already L2-normalised by the caller; v: (T, Hv, Dv); g, beta: (T, Hv).
  Hv is a multiple of Hk and value head h reads query/key head h // (Hv // Hk).
- Sequences are packed along dim 0; `cu_seqlens` (N+1,) int64 holds cumulative lengths from 0.
- States are (N, Hv, Dk, Dv) float32; `initial_state=None` means zeros.
- All arithmetic is float32. Outputs are cast to v.dtype; returned states are fresh float32
  tensors. No input is mutated.

At the bottom, `fla_*` wrap flash-linear-attention's Triton kernels for CUDA tensors.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _float32_heads(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to float32, give every value head its own query/key copy, and scale the queries.

    Works for any leading dim (tokens or sequences): q, k (L, Hk, Dk) -> (L, Hv, Dk).
    """
    heads_per_key = v.shape[1] // k.shape[1]
    query = q.float().repeat_interleave(heads_per_key, dim=1) * scale  # (L, Hv, Dk)
    key = k.float().repeat_interleave(heads_per_key, dim=1)  # (L, Hv, Dk)
    return query, key, v.float(), g.float(), beta.float()


def _start_states(initial_state: Tensor | None, num_seqs: int, v: Tensor, key_dim: int) -> Tensor:
    """A fresh float32 (N, Hv, Dk, Dv) copy of the initial states (zeros when None)."""
    if initial_state is None:
        return v.new_zeros(num_seqs, v.shape[1], key_dim, v.shape[2], dtype=torch.float32)
    return initial_state.to(device=v.device, dtype=torch.float32, copy=True)


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence token by token. Returns (o (T, Hv, Dv), final_state (N, Hv, Dk, Dv))."""
    query, key, value, decay, beta = _float32_heads(q, k, v, g, beta, scale)
    bounds = cu_seqlens.tolist()
    states = _start_states(initial_state, len(bounds) - 1, v, k.shape[-1])  # (N, Hv, Dk, Dv)
    out = torch.empty_like(value)  # (T, Hv, Dv)

    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = states[seq]  # (Hv, Dk, Dv)
        for t in range(start, end):
            q_t, k_t, v_t = query[t], key[t], value[t]  # (Hv, Dk), (Hv, Dk), (Hv, Dv)
            # Forget: decay the whole memory.
            state = state * decay[t].exp()[:, None, None]
            # Recall what the memory holds for k_t, and write beta_t of the error back under k_t.
            kv_mem = (k_t[:, :, None] * state).sum(dim=1)  # (Hv, Dv)
            delta = beta[t][:, None] * (v_t - kv_mem)  # (Hv, Dv)
            state = state + k_t[:, :, None] * delta[:, None, :]
            # Read with the query, after this token's write.
            out[t] = (q_t[:, :, None] * state).sum(dim=1)  # (Hv, Dv)
        states[seq] = state

    return out.to(v.dtype), states


def recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """One decode step for N sequences at once (one token each).

    q, k: (N, Hk, Dk); v: (N, Hv, Dv); g, beta: (N, Hv); state: (N, Hv, Dk, Dv).
    Returns (o (N, Hv, Dv) in v.dtype, new_state (N, Hv, Dk, Dv) float32). `state` is not
    mutated: the caller writes new_state back into its cache.
    """
    query, key, value, decay, beta = _float32_heads(q, k, v, g, beta, scale)
    new_state = state.float() * decay.exp()[..., None, None]  # (N, Hv, Dk, Dv), a new tensor
    kv_mem = torch.einsum("nhk,nhkv->nhv", key, new_state)  # (N, Hv, Dv)
    delta = beta[..., None] * (value - kv_mem)  # (N, Hv, Dv)
    new_state += key[..., :, None] * delta[..., None, :]
    out = torch.einsum("nhk,nhkv->nhv", query, new_state)  # (N, Hv, Dv)
    return out.to(v.dtype), new_state


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None,
    scale: float,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked form for prefill; same contract and result as `naive_gated_delta_rule`.

    Each sequence is cut into windows of `_CHUNKS_PER_WINDOW` chunks. Within a window all
    chunks and heads are processed at once (the intra-chunk phase); only the hand-over of the
    state from one chunk to the next is a Python loop (T / chunk_size steps in all).
    """
    query, key, value, decay, beta = _float32_heads(q, k, v, g, beta, scale)
    bounds = cu_seqlens.tolist()
    states = _start_states(initial_state, len(bounds) - 1, v, k.shape[-1])  # (N, Hv, Dk, Dv)
    out = torch.empty_like(value)  # (T, Hv, Dv)
    window = chunk_size * _CHUNKS_PER_WINDOW

    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = states[seq]  # (Hv, Dk, Dv)
        for window_start in range(start, end, window):
            span = slice(window_start, min(window_start + window, end))
            out[span], state = _chunk_window(
                query[span], key[span], value[span], decay[span], beta[span], state, chunk_size
            )
        states[seq] = state
    return out.to(v.dtype), states


# Windows bound the intra-chunk temporaries to ~(H, 512, D) floats whatever the sequence length.
# Whole-sequence temporaries (tens of MB at 4k tokens) were ~1.8x slower on CPU: each one is a
# fresh mmap that page-faults on first touch, and none stays in cache.
_CHUNKS_PER_WINDOW = 8


def _to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """(L, H, ...) -> contiguous (num_chunks, H, chunk_size, ...), zero-padding the tail.

    Zero padding is inert: k = 0 and beta = 0 write nothing and g = 0 decays nothing, so the
    state after the padded tail is the state after the last real token. Chunk-major layout
    makes each step of the scan read one contiguous block.
    """
    pad = -x.shape[0] % chunk_size
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    x = x.reshape(x.shape[0] // chunk_size, chunk_size, *x.shape[1:])  # (M, C, H, ...)
    return x.transpose(1, 2).contiguous()  # (M, H, C, ...)


def _chunk_window(
    query: Tensor, key: Tensor, value: Tensor, decay: Tensor, beta: Tensor, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """L consecutive tokens of one sequence: query, key (L, H, Dk); value (L, H, Dv); decay,
    beta (L, H); state (H, Dk, Dv) entering the window. Returns (out (L, H, Dv), state after).

    Within a chunk, with D(i, j) = exp(sum of g over (j, i]) and S0 the state entering the
    chunk, unrolling the recurrence gives the per-token writes u_i = delta_i (Dv,) as

        u_i + beta_i * sum_{j<i} D(i, j) (k_i . k_j) u_j = beta_i v_i - beta_i D(i, start) k_i^T S0

    a unit lower-triangular system (I + A) u = v_beta - k_beta_decayed S0. Solving it for both
    right-hand sides once per chunk (the UT transform) leaves only matmuls against S0.
    """
    length = query.shape[0]
    query, key, value, decay, beta = (_to_chunks(x, chunk_size) for x in (query, key, value, decay, beta))
    # query, key: (M, H, C, Dk); value: (M, H, C, Dv); decay, beta: (M, H, C)

    # Phase 1, intra-chunk (all chunks at once). Cumulative log-decay from the chunk start:
    # every decay factor below is exp of a difference <= 0, so nothing overflows.
    cum_decay = decay.cumsum(dim=-1)  # (M, H, C)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).tril()
    pair_decay = (cum_decay[..., :, None] - cum_decay[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    # pair_decay[..., i, j] = D(i, j) for j <= i, else 0.   (M, H, C, C)

    k_beta = key * beta[..., None]  # (M, H, C, Dk)
    ut_system = (k_beta @ key.transpose(-1, -2)).mul_(pair_decay)  # (M, H, C, C); diagonal ignored
    new_values = torch.linalg.solve_triangular(  # u for S0 = 0                    (M, H, C, Dv)
        ut_system, value * beta[..., None], upper=False, unitriangular=True
    )
    state_readers = torch.linalg.solve_triangular(  # how each u_i reads S0        (M, H, C, Dk)
        ut_system, k_beta * cum_decay.exp()[..., None], upper=False, unitriangular=True
    )
    intra_attn = (query @ key.transpose(-1, -2)).mul_(pair_decay)  # (M, H, C, C), diagonal kept
    query_from_start = query * cum_decay.exp()[..., None]  # reads S0, decayed to token i
    key_to_end = (key * (cum_decay[..., -1:] - cum_decay).exp()[..., None]).transpose(-1, -2).contiguous()
    # key_to_end: (M, H, Dk, C), writes decayed to the chunk end
    chunk_decay = cum_decay[..., -1].exp()[..., None, None]  # (M, H, 1, 1)

    # Phase 2, the scan over chunks: correct the writes for the incoming state, read, hand over.
    out = torch.empty_like(value)  # (M, H, C, Dv)
    for m in range(query.shape[0]):
        writes = new_values[m] - state_readers[m] @ state  # (H, C, Dv)
        torch.baddbmm(query_from_start[m] @ state, intra_attn[m], writes, out=out[m])
        state = torch.baddbmm(state * chunk_decay[m], key_to_end[m], writes)

    out = out.transpose(1, 2).flatten(0, 1)[:length]  # (L, H, Dv)
    return out, state


# ---------------------------------------------------------------------------------------------
# CUDA fast paths: flash-linear-attention (fla) Triton kernels.
#
# fla is imported only inside these functions: importing it on a CPU-only machine makes
# transformers pick it up as the gated-delta implementation and breaks its torch path.
# ---------------------------------------------------------------------------------------------


def fla_available(device: torch.device | str) -> bool:
    """True when `device` is CUDA and `fla.ops.gated_delta_rule` imports."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


def _require_cuda(*tensors: Tensor) -> None:
    if not all(t.is_cuda for t in tensors):
        raise ValueError("the fla gated delta rule kernels need CUDA tensors")


def fla_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None,
    scale: float,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """`chunk_gated_delta_rule` on fla's Triton kernel. UNTESTED ON CPU MACHINES.

    Same contract as `chunk_gated_delta_rule`, plus: CUDA tensors only; q, k and v are cast to
    v.dtype, which fla wants to be bf16 or fp16 (its chunk kernel rejects fp32). `chunk_size` is
    accepted for signature parity and ignored (fla fixes 64). q and k are expanded to Hv heads
    because fla's chunk kernel does not handle Hv > Hk in every release.
    Calls `fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale,
    initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)` on a batch of one
    ([1, T, H, D]), as fla requires with `cu_seqlens`.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    _require_cuda(q, k, v, g, beta)
    heads_per_key = v.shape[1] // k.shape[1]
    query, key = (x.to(v.dtype).repeat_interleave(heads_per_key, dim=1) for x in (q, k))
    out, final_state = fla_chunk(
        q=query[None],
        k=key[None],
        v=v[None],
        g=g[None].float(),
        beta=beta[None],
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=cu_seqlens,
    )
    return out[0].to(v.dtype), final_state.float()


def fla_recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """`recurrent_gated_delta_rule` on fla's fused recurrent kernel. UNTESTED ON CPU MACHINES.

    Same contract as `recurrent_gated_delta_rule`, plus: CUDA tensors only. The N sequences go
    in as a batch of N one-token sequences ([N, 1, H, D]), so no `cu_seqlens` is needed.
    Calls `fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule(q, k, v, g, beta=,
    scale=, initial_state=, output_final_state=True, use_qk_l2norm_in_kernel=False)`.
    """
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    _require_cuda(q, k, v, g, beta, state)
    heads_per_key = v.shape[1] // k.shape[1]
    query, key = (x.to(v.dtype).repeat_interleave(heads_per_key, dim=1) for x in (q, k))
    out, new_state = fla_recurrent(
        q=query[:, None],
        k=key[:, None],
        v=v[:, None],
        g=g[:, None].float(),
        beta=beta[:, None],
        scale=scale,
        initial_state=state.float(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return out[:, 0].to(v.dtype), new_state.float()
