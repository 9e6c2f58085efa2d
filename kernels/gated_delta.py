"""The gated delta rule of Gated DeltaNet (the "linear_attention" layers of Qwen3-Next / Qwen3.5).

Each value head keeps a state S of shape (Dk, Dv): an associative memory from keys to values.
Per token t, with log-decay g_t <= 0 and write strength beta_t in (0, 1):

    S      = exp(g_t) * S                    # forget a little
    kv_mem = k_t^T S                         # (Dv,) what the memory recalls for k_t
    delta  = beta_t * (v_t - kv_mem)         # (Dv,) the correction (the "delta rule")
    S      = S + outer(k_t, delta)           # write the correction under k_t
    o_t    = (scale * q_t)^T S               # (Dv,) read with the query

Three forms with one contract, and the engine's forms on its state pool:

- `naive_gated_delta_rule`: the loop above, token by token (the reference).
- `chunk_gated_delta_rule`: the chunked WY / UT-transform form, for training (differentiable)
  and for serving prefill where no C kernel runs.
- `recurrent_gated_delta_rule`: one step for one token of each of N sequences, for decode
  where no C kernel runs.
- `gated_delta_decode(_cpu)`, `gated_delta_prefill(_cpu)`: the decode step and the prefill on
  states kept in rows of an engine's state pool, which they update IN PLACE (the CPU forms:
  the recurrence in one C pass); they return only the outputs.

Shared conventions (flat varlen batches):

- q, k: (T, Hk, Dk), already L2-normalised by the caller; v: (T, Hv, Dv); g, beta: (T, Hv).
  Hv is a multiple of Hk and value head h reads query/key head h // (Hv // Hk).
- Sequences are packed along dim 0; `cu_seqlens` (N+1,) int64 holds cumulative lengths from 0.
- States are (N, Hv, Dk, Dv) float32; `initial_state=None` means zeros.
- All arithmetic is float32. Outputs are cast to v.dtype; returned states are fresh float32
  tensors. No input is mutated, except the pool of the `*_decode` / `*_prefill` forms.

At the bottom, `fla_*` wrap flash-linear-attention's Triton kernels for CUDA tensors.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from kernels import cpu_ext

_MAX_HEAD_DIM = 512  # = MAX_HEAD_DIM in csrc/linear_attention.c
_ARGS = (cpu_ext.P,) * 9 + (cpu_ext.I64,) * 8 + (cpu_ext.F32, cpu_ext.INT, cpu_ext.INT, cpu_ext.INT)


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
    new_state = new_state + key[..., :, None] * delta[..., None, :]  # out of place: autograd-safe
    out = torch.einsum("nhk,nhkv->nhv", query, new_state)  # (N, Hv, Dv)
    return out.to(v.dtype), new_state


def gated_delta_decode(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, pool: Tensor, slots: Tensor, scale: float,
    rule: Callable[..., tuple[Tensor, Tensor]] = recurrent_gated_delta_rule,
) -> Tensor:
    """A decode step whose states live in rows `slots` (N,) distinct, of `pool` (num_slots, Hv,
    Dk, Dv) float32: `rule` on the gathered rows, the new states written back. Returns o
    (N, Hv, Dv)."""
    out, pool[slots] = rule(q, k, v, g, beta, pool[slots], scale)
    return out


def gated_delta_decode_cpu(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, pool: Tensor, slots: Tensor, scale: float
) -> Tensor:
    """`gated_delta_decode` in one C pass (kernels/csrc/linear_attention.c), each state updated
    in place in the pool; the torch form under autograd or for other layouts/dtypes. q, k
    (float32 or bf16) and v may be strided over tokens, heads contiguous within a token."""
    out = _gated_delta_cpu(q, k, v, g, beta, None, pool, slots, scale)
    return gated_delta_decode(q, k, v, g, beta, pool, slots, scale) if out is None else out


def gated_delta_prefill(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor, pool: Tensor, slots: Tensor,
    scale: float, rule: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """A prefill of the packed sequences `cu_seqlens` whose states live in rows `slots` (N,)
    distinct, of `pool`: `rule` (default `chunk_gated_delta_rule`) from the gathered rows, the
    final states written back. Returns o (T, Hv, Dv)."""
    out, pool[slots] = (rule or chunk_gated_delta_rule)(q, k, v, g, beta, cu_seqlens, pool[slots], scale)
    return out


def gated_delta_prefill_cpu(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor, pool: Tensor, slots: Tensor,
    scale: float,
) -> Tensor:
    """`gated_delta_prefill` as the recurrence token by token in C, each state kept in cache
    and updated in place in the pool: 5x the chunked torch form at 512 tokens on 2 cores,
    7x at 2048 (the chunked form's matmuls of 64 x 64 blocks and elementwise passes cost
    more than the recurrence's few FLOPs per state element on a CPU), and the reference's
    maths (not its rounding: -ffast-math reorders). The torch form under autograd or for
    other layouts/dtypes."""
    out = _gated_delta_cpu(q, k, v, g, beta, cu_seqlens, pool, slots, scale)
    return gated_delta_prefill(q, k, v, g, beta, cu_seqlens, pool, slots, scale) if out is None else out


def _gated_delta_cpu(q, k, v, g, beta, cu_seqlens: Tensor | None, pool: Tensor, slots: Tensor, scale: float):
    """The C kernel over packed sequences (`cu_seqlens`; None: one token per sequence), or None
    when it cannot take these inputs."""
    ok = cpu_ext.fast_path_ok(q, k, v, g, beta, pool) and slots.device.type == "cpu"
    ok = ok and (cu_seqlens is None or cu_seqlens.device.type == "cpu")
    fn = cpu_ext.function("linear_attention", "gated_delta", _ARGS) if ok else None
    t, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    n = slots.shape[0] if slots.dim() == 1 else -1
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    if (
        fn is None
        or q.dtype != k.dtype
        or q.shape != k.shape
        or v.shape[0] != t or g.shape != (t, hv) or beta.shape != (t, hv)
        or (n != t if cu is None else n != cu.numel() - 1 or not cpu_ext.packed_bounds_ok(cu.tolist(), t))
        or max(dk, dv) > _MAX_HEAD_DIM
        or hv % hk
        or any(x.stride(2) != 1 or x.stride(1) != x.shape[2] for x in (q, k, v))
        or pool.dtype != torch.float32 or not pool.is_contiguous() or pool.shape[1:] != (hv, dk, dv)
        or slots.dtype != torch.int64 or not slots.is_contiguous()
    ):
        return None
    cpu_ext.check_slots(slots, pool.shape[0])
    g, beta = g.float().contiguous(), beta.float().contiguous()
    out = v.new_empty(t, hv, dv)
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), beta.data_ptr(), pool.data_ptr(), slots.data_ptr(),
       cpu_ext.ptr(cu), out.data_ptr(), n, hk, hv, dk, dv, q.stride(0), k.stride(0), v.stride(0), scale,
       int(q.dtype == torch.bfloat16), int(v.dtype == torch.bfloat16), torch.get_num_threads())
    return out


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
    """Chunked form for prefill and training; same contract and result as
    `naive_gated_delta_rule`, differentiable (no in-place op on anything autograd saves).

    Every sequence is cut into chunks of `chunk_size` tokens, and the chunks of ALL sequences
    are laid out chunk-major (`_ChunkLayout`). The intra-chunk phase runs on all chunks of a
    window at once; the hand-over of states from chunk c to c+1 is one batched step for all
    sequences still running, so a prefill of 32 prompts costs as many Python steps as its
    longest prompt has chunks.
    """
    num_tokens, heads, value_dim = v.shape
    num_seqs = cu_seqlens.numel() - 1
    states = _start_states(initial_state, num_seqs, v, k.shape[2])  # (N, Hv, Dk, Dv)
    if num_tokens == 0:
        return v.new_empty(v.shape), states
    layout = _ChunkLayout(cu_seqlens.tolist(), chunk_size, heads, k.shape[1], v.device)

    query = layout.gather(q, layout.key_index) * scale  # (rows, Hv, C, Dk)
    key = layout.gather(k, layout.key_index)  # (rows, Hv, C, Dk)
    value = layout.gather(v, layout.value_index)  # (rows, Hv, C, Dv)
    decay = layout.gather(g[..., None], layout.value_index)[..., 0] * layout.real  # (rows, Hv, C)
    beta = layout.gather(beta[..., None], layout.value_index)[..., 0] * layout.real

    running = layout.running
    outs, finals = [], []
    state = states[layout.order[: running[0]]]  # (n_0, Hv, Dk, Dv): the running sequences' states
    row = 0
    for first, last in _windows(running):
        rows = slice(row, row + sum(running[first:last]))
        terms = _intra_chunk(query[rows], key[rows], value[rows], decay[rows], beta[rows], chunk_size)
        offset = 0
        for c in range(first, last):
            out_c, state = _hand_over(terms, slice(offset, offset + running[c]), state)
            outs.append(out_c)
            offset += running[c]
            n_next = running[c + 1] if c + 1 < len(running) else 0
            finals.append(state[n_next:])  # the sequences whose last chunk this was
            state = state[:n_next]
        row = rows.stop

    out = torch.cat(outs).reshape(-1, value_dim).index_select(0, layout.token_rows.flatten())
    final = torch.cat(finals)  # in the order the sequences finished
    finished = torch.tensor(layout.finished, device=final.device)
    if len(layout.finished) < num_seqs:  # sequences without tokens keep their state
        states = states.index_copy(0, finished, final)
    else:
        states = final[torch.argsort(finished)]
    return out.view(num_tokens, heads, value_dim).to(v.dtype), states


class _ChunkLayout:
    """Where each token of a packed batch goes in the chunk-major layout, and back.

    Rows are (c, r) for r < n_c: chunk c of sequence order[r], with sequences ordered longest
    first, so the n_c sequences that have a chunk c are always the first n_c. Each row gathers
    `chunk_size` tokens; the tail of a sequence's last chunk re-reads a real token and is made
    inert by g = beta = 0 (`real`): it then writes nothing and decays nothing, and no real
    token reads it (causality).
    """

    def __init__(self, bounds: list[int], chunk_size: int, heads: int, key_heads: int, device: torch.device):
        num_seqs = len(bounds) - 1
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        chunks = [-(-length // chunk_size) for length in lengths]
        self.order = sorted(range(num_seqs), key=lambda s: -chunks[s])  # stable
        self.running = [sum(1 for n in chunks if n > c) for c in range(chunks[self.order[0]])]  # n_c
        ends = self.running[1:] + [0]
        # The order in which sequences finish: 1-chunk ones first; within a chunk count, as in `order`.
        self.finished = [self.order[r] for n_c, n_next in zip(self.running, ends) for r in range(n_next, n_c)]

        starts = torch.tensor(bounds[:-1], device=device)
        lengths_t = torch.tensor(lengths, device=device)
        row_seq = torch.tensor([self.order[r] for n_c in self.running for r in range(n_c)], device=device)
        row_chunk = torch.tensor([c for c, n_c in enumerate(self.running) for _ in range(n_c)], device=device)
        token = starts[row_seq, None] + row_chunk[:, None] * chunk_size + torch.arange(chunk_size, device=device)
        self.real = (token < (starts + lengths_t)[row_seq, None])[:, None, :].float()  # (rows, 1, C)
        token = token.clamp(max=bounds[-1] - 1)
        head = torch.arange(heads, device=device)
        self.value_index = token[:, None, :] * heads + head[:, None]  # (rows, Hv, C) into (T * Hv)
        # Value head h reads query/key head h // (Hv / Hk).
        self.key_index = token[:, None, :] * key_heads + (head // (heads // key_heads))[:, None]

        # Back: token t at offset o of sequence s sits in row base[o // C] + rank[s], column o % C.
        rank = torch.empty(num_seqs, dtype=torch.int64, device=device)
        rank[torch.tensor(self.order, device=device)] = torch.arange(num_seqs, device=device)
        base = torch.tensor([0, *self.running], device=device).cumsum(0)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths_t)
        offset = torch.arange(bounds[-1], device=device) - starts[seq_of_token]
        row = base[offset // chunk_size] + rank[seq_of_token]
        self.token_rows = (row[:, None] * heads + head) * chunk_size + (offset % chunk_size)[:, None]  # (T, Hv)

    @staticmethod
    def gather(x: Tensor, index: Tensor) -> Tensor:
        """(T, H, D) float32 rows by (T * H)-indices (index_select: ~4x faster than x[index])."""
        return x.float().flatten(0, 1).index_select(0, index.flatten()).view(*index.shape, x.shape[2])


# A window is a run of chunk indices whose rows (chunks of all running sequences) go through the
# intra-chunk phase together: about `_ROWS_PER_WINDOW` rows, so the (rows, H, C, C) temporaries
# stay a few MB whatever the batch (whole-batch temporaries of tens of MB were ~1.8x slower on
# CPU: each is a fresh mmap that page-faults on first touch, and none stays in cache).
_ROWS_PER_WINDOW = 16
_MIN_EXPONENT = -80.0


def _windows(running: list[int]) -> list[tuple[int, int]]:
    """Split chunk indices 0..len(running) into [first, last) runs of ~_ROWS_PER_WINDOW rows."""
    windows, first, rows = [], 0, 0
    for c, n_c in enumerate(running):
        if rows and rows + n_c > _ROWS_PER_WINDOW:
            windows.append((first, c))
            first, rows = c, 0
        rows += n_c
    windows.append((first, len(running)))
    return windows


class _ChunkTerms(NamedTuple):
    """Phase 1's results, per chunk (M, H, ...): what the hand-over needs."""

    new_values: Tensor  # (M, H, C, Dv) the writes u for S0 = 0
    state_readers: Tensor  # (M, H, C, Dk) how each u_i reads S0
    intra_attn: Tensor  # (M, H, C, C) decayed q_i . k_j for j <= i
    query_from_start: Tensor  # (M, H, C, Dk) queries reading S0, decayed to their token
    key_to_end: Tensor  # (M, H, Dk, C) writes decayed to the chunk end
    chunk_decay: Tensor  # (M, H, 1, 1) the whole chunk's decay


def _intra_chunk(query: Tensor, key: Tensor, value: Tensor, decay: Tensor, beta: Tensor, chunk_size: int) -> _ChunkTerms:
    """Phase 1 on M chunks at once: query, key (M, H, C, Dk); value (M, H, C, Dv); decay, beta
    (M, H, C).

    Within a chunk, with D(i, j) = exp(sum of g over (j, i]) and S0 the state entering the
    chunk, unrolling the recurrence gives the per-token writes u_i = delta_i (Dv,) as

        u_i + beta_i * sum_{j<i} D(i, j) (k_i . k_j) u_j = beta_i v_i - beta_i D(i, start) k_i^T S0

    a unit lower-triangular system (I + A) u = v_beta - k_beta_decayed S0. Solving it for both
    right-hand sides once per chunk (the UT transform) leaves only matmuls against S0.
    Padding with g = beta = 0 is inert: it writes nothing and decays nothing.
    """
    # Cumulative log-decay from the chunk start: every decay factor below is exp of a
    # difference <= 0, so nothing overflows. Exponents are clamped at -80 (exp = 2e-35): exp
    # of anything that underflows takes a slow path on the CPU (~15x slower).
    cum_decay = decay.cumsum(dim=-1)  # (M, H, C)
    causal = torch.ones(chunk_size, chunk_size, device=query.device).tril()
    pair_decay = (cum_decay[..., :, None] - cum_decay[..., None, :]).clamp(_MIN_EXPONENT, 0).exp() * causal
    # pair_decay[..., i, j] = D(i, j) for j <= i, else 0.   (M, H, C, C)
    start_decay = cum_decay.clamp(min=_MIN_EXPONENT).exp()  # (M, H, C): D(i, start)

    k_beta = key * beta[..., None]  # (M, H, C, Dk)
    ut_system = (k_beta @ key.transpose(-1, -2)) * pair_decay  # (M, H, C, C); diagonal ignored
    new_values = torch.linalg.solve_triangular(  # u for S0 = 0                    (M, H, C, Dv)
        ut_system, value * beta[..., None], upper=False, unitriangular=True
    )
    state_readers = torch.linalg.solve_triangular(  # how each u_i reads S0        (M, H, C, Dk)
        ut_system, k_beta * start_decay[..., None], upper=False, unitriangular=True
    )
    intra_attn = (query @ key.transpose(-1, -2)) * pair_decay  # (M, H, C, C), diagonal kept
    query_from_start = query * start_decay[..., None]  # reads S0, decayed to token i
    key_to_end = (key * (cum_decay[..., -1:] - cum_decay).clamp(min=_MIN_EXPONENT).exp()[..., None]).transpose(-1, -2)
    chunk_decay = start_decay[..., -1, None, None]  # (M, H, 1, 1)
    return _ChunkTerms(new_values, state_readers, intra_attn, query_from_start, key_to_end, chunk_decay)


def _hand_over(terms: _ChunkTerms, rows: slice, state: Tensor) -> tuple[Tensor, Tensor]:
    """Phase 2 for one chunk of each running sequence (`rows` of the phase-1 terms, in the
    order of `state` (n, H, Dk, Dv)): correct the writes for the incoming state, read, pass the
    state on. Returns (out (n, H, C, Dv), state after the chunk)."""
    t = _ChunkTerms(*(x[rows] for x in terms))
    writes = t.new_values - t.state_readers @ state  # (n, H, C, Dv)
    out = t.query_from_start @ state + t.intra_attn @ writes
    return out, state * t.chunk_decay + t.key_to_end @ writes


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


def fla_gated_delta_decode(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, pool: Tensor, slots: Tensor, scale: float
) -> Tensor:
    """`gated_delta_decode` on fla's fused recurrent kernel (CUDA tensors only)."""
    return gated_delta_decode(q, k, v, g, beta, pool, slots, scale, rule=fla_recurrent_gated_delta_rule)


def fla_gated_delta_prefill(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor, pool: Tensor, slots: Tensor,
    scale: float,
) -> Tensor:
    """`gated_delta_prefill` on fla's chunk kernel (CUDA tensors only)."""
    return gated_delta_prefill(q, k, v, g, beta, cu_seqlens, pool, slots, scale, rule=fla_chunk_gated_delta_rule)
