"""Paged attention over block tables for a flat varlen batch, the KV write, and dense varlen
attention for training.

Cache layout, one pair per full-attention layer:

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
    slot = block_id * block_size + offset   (the flat index the KV write uses)

A step's batch is flat: T tokens from N sequences, decodes (query_len 1) first, then prefill
chunks. Sequence i's queries are the LAST query_len[i] positions of its context of
context_len[i] tokens (context includes this step's tokens, already written to the cache),
so causal masking is aligned bottom-right: query j of sequence i sees keys
0 .. context_len[i] - query_len[i] + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_ext


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys live; built once per step, shared by all layers.

    Valid for one forward pass: block tables describe the cache as the scheduler left it for
    this step.
    """

    num_decodes: int  # sequences [0, num_decodes) have query_len 1
    query_lens: list[int]  # (N,) host copy, for slicing
    context_lens: list[int]  # (N,) host copy
    cu_seqlens_q: torch.Tensor  # (N + 1,) int64
    context_lens_t: torch.Tensor  # (N,) int64
    block_tables: torch.Tensor  # (N, max_blocks) int64; entries past a sequence's blocks are 0
    slot_mapping: torch.Tensor  # (T,) int64, where each new token's K/V is written
    # Decode fast path: the decodes' blocks gathered in one index_select, padded to the
    # longest with block 0 and masked (True = attend).
    decode_block_ids: torch.Tensor | None = None  # (num_decodes * max_decode_blocks,) int64
    decode_mask: torch.Tensor | None = None  # (num_decodes, 1, 1, max_decode_blocks * block_size)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: torch.Tensor,
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        assert all(q > 1 for q in query_lens[num_decodes:]), "decodes must come first"
        max_blocks = max((len(b) for b in block_tables), default=0)
        table = torch.zeros((len(block_tables), max(max_blocks, 1)), dtype=torch.int64)
        for i, blocks in enumerate(block_tables):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(query_lens, dtype=torch.int64).cumsum(0)
        ctx = torch.tensor(context_lens, dtype=torch.int64)
        decode_block_ids = decode_mask = None
        if num_decodes:
            max_dec_blocks = max(-(-c // block_size) for c in context_lens[:num_decodes])
            decode_block_ids = table[:num_decodes, :max_dec_blocks].reshape(-1).to(device)
            positions = torch.arange(max_dec_blocks * block_size)
            decode_mask = (positions[None, :] < ctx[:num_decodes, None])[:, None, None, :]
            decode_mask = decode_mask.to(device)
        return cls(
            num_decodes=num_decodes,
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            cu_seqlens_q=cu.to(device),
            context_lens_t=ctx.to(device),
            block_tables=table.to(device),
            slot_mapping=slot_mapping,
            decode_block_ids=decode_block_ids,
            decode_mask=decode_mask,
        )


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's keys/values (T, Hkv, D) into their cache slots. Mutates the caches."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_kv_reference`, and on CPU without autograd one C call copies the rows (k and v
    may be strided views of a fused projection, as long as each token's heads are contiguous)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    fn = cpu_ext.function("cpu_ops", "write_kv", _WRITE_KV_ARGS) if cpu_ext.fast_path_ok(k, v, k_cache) else None
    if (
        fn is not None
        and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k.stride(1) == v.stride(1) == head_dim
        and k.stride(2) == v.stride(2) == 1
    ):
        fn(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
           k.shape[0], num_kv_heads * head_dim, k.stride(0), v.stride(0), k.element_size(), torch.get_num_threads())
        return
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def _gather_context(cache: torch.Tensor, blocks: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len cached positions of one sequence: (context_len, Hkv, D)."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return cache.index_select(0, blocks[:num_blocks]).flatten(0, 1)[:context_len]


def _bottom_right_causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """(query_len, key_len) bool, True = attend; query j sits at key position key_len - query_len + j."""
    q_pos = torch.arange(key_len - query_len, key_len, device=device)
    return torch.arange(key_len, device=device)[None, :] <= q_pos[:, None]


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The definition: per sequence, gather its context and apply causal softmax attention in fp32.

    q (T, Hq, D) -> (T, Hq, D) in q.dtype. Grouped-query: query head h reads kv head h // (Hq // Hkv).
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qi = q[start : start + q_len].float()  # (q_len, Hq, D)
        ki = _gather_context(k_cache, meta.block_tables[i], ctx_len).float().repeat_interleave(group, dim=1)
        vi = _gather_context(v_cache, meta.block_tables[i], ctx_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale  # (Hq, q_len, ctx_len)
        mask = _bottom_right_causal_mask(q_len, ctx_len, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, vi).to(q.dtype)
        start += q_len
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    skip_decodes: bool = False,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`.

    Decodes are batched: their blocks are gathered with one index_select (padded to the
    longest context, masked) and attended with two batched matmuls, softmax in fp32. Each
    prefill chunk is one SDPA call with a bottom-right causal mask.
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd and not skip_decodes:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    start = nd
    for i in range(nd, len(meta.query_lens)):
        q_len, ctx_len = meta.query_lens[i], meta.context_lens[i]
        k = _gather_context(k_cache, meta.block_tables[i], ctx_len).transpose(0, 1)  # (Hkv, ctx, D)
        v = _gather_context(v_cache, meta.block_tables[i], ctx_len).transpose(0, 1)
        # 4-D (a batch of one): on CPU, 3-D inputs take SDPA's math fallback (bmm + softmax,
        # ~6x slower at 512 tokens, measured); 4-D ones its flash kernel.
        qi = q[start : start + q_len].transpose(0, 1)[None]  # (1, Hq, q_len, D)
        k, v = k.to(q.dtype)[None], v.to(q.dtype)[None]
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = _bottom_right_causal_mask(q_len, ctx_len, q.device)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q (nd, Hq, D) -> (nd, Hq, D); one query per sequence at the end of its context."""
    nd, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = meta.decode_mask.shape[-1]
    k = k_cache.index_select(0, meta.decode_block_ids).view(nd, max_len, num_kv_heads, head_dim)
    v = v_cache.index_select(0, meta.decode_block_ids).view(nd, max_len, num_kv_heads, head_dim)
    q = q.view(nd, num_kv_heads, group, head_dim).to(k.dtype)
    scores = torch.einsum("bhgd,blhd->bhgl", q, k).float() * scale  # (nd, Hkv, G, L)
    scores = scores.masked_fill(~meta.decode_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(nd, num_heads, head_dim)


_ATTN_ARGS = (cpu_ext.P,) * 6 + (cpu_ext.I64,) * 6 + (cpu_ext.F32, cpu_ext.INT, cpu_ext.INT)
_WRITE_KV_ARGS = (cpu_ext.P,) * 5 + (cpu_ext.I64,) * 5 + (cpu_ext.INT,)


def _c_kernel():
    return cpu_ext.function("paged_decode_attention", "paged_decode_attention", _ATTN_ARGS)


def c_decode_available(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16) and _c_kernel() is not None


def _c_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The decode part of `paged_attention` through the C kernel (csrc/paged_decode_attention.c):
    reads each sequence's blocks in place, no gather."""
    nd, num_heads, head_dim = q.shape
    q = q.to(k_cache.dtype).contiguous()
    out = torch.empty_like(q)
    tables = meta.block_tables  # rows [0, nd) are the decodes; the kernel reads only those
    ctx = meta.context_lens_t
    assert tables.dtype == ctx.dtype == torch.int64 and tables.is_contiguous() and k_cache.is_contiguous()
    rc = _c_kernel()(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), ctx.data_ptr(), out.data_ptr(),
        nd, tables.shape[1], num_heads, k_cache.shape[2], head_dim, k_cache.shape[1],
        scale, int(k_cache.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError("paged_decode_attention failed to start its threads")
    return out


def paged_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """`paged_attention` with decodes through the C kernel (CPU, fp32/bf16 caches; any other
    cache dtype takes the torch path: the kernel reads raw fp32 or bf16 buffers)."""
    nd = meta.num_decodes
    if k_cache.dtype not in (torch.float32, torch.bfloat16) or v_cache.dtype != k_cache.dtype:
        return paged_attention(q, k_cache, v_cache, meta, scale)
    if nd == len(meta.query_lens):
        return _c_decode_attention(q, k_cache, v_cache, meta, scale).to(q.dtype)
    out = paged_attention(q, k_cache, v_cache, meta, scale, skip_decodes=nd > 0)
    if nd:
        out[:nd] = _c_decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """Dense causal attention within each packed sequence (training: no cache, autograd-safe).

    q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens host list of N + 1 offsets -> (T, Hq, D).
    """
    outs = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        # A batch of one (4-D), as in `paged_attention`: on CPU that takes SDPA's flash kernel,
        # forward and backward (bf16, 512 tokens: 27.5 -> 14.1 ms for both, measured).
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],
            k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------------------
# CUDA: flash-attn (the optional `gpu` extra). UNTESTED on this project's CPU-only CI machine.
# ---------------------------------------------------------------------------------------------


def flash_attn_available(device: torch.device, dtype: torch.dtype, block_size: int) -> bool:
    """flash-attn's paged varlen path: importable, on CUDA, fp16/bf16, and pages whose size is
    a multiple of 256 tokens (flash-attn 2's paged-KV requirement; use `block_size: 256`)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or block_size % 256:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """`paged_attention` through flash_attn_varlen_func with a block table (decodes and
    prefill chunks in one call; bottom-right causal alignment is flash-attn's). UNTESTED here:
    this project's CI has no GPU."""
    from flash_attn import flash_attn_varlen_func

    cu_k = torch.zeros(len(meta.context_lens) + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = meta.context_lens_t.cumsum(0)
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q=meta.cu_seqlens_q.to(torch.int32),
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(meta.query_lens),
        max_seqlen_k=max(meta.context_lens),
        softmax_scale=scale,
        causal=True,
        block_table=meta.block_tables.to(torch.int32),
    )
