"""Paged attention (fast path) against its reference, and both against dense attention."""

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_reference,
    varlen_attention,
    write_kv,
)
from tests.helpers import rel_rms

# (query_lens, context_lens): decodes (query 1) first, then prefill chunks; a chunk whose
# context is longer than its queries continues an earlier chunk.
LAYOUTS = {
    "decodes-only": ([1, 1, 1], [1, 17, 40]),
    "prefills-only": ([5, 33], [5, 33]),
    "mixed": ([1, 1, 7, 16, 3], [9, 30, 7, 40, 3]),
    "chunk-continuation": ([1, 12], [64, 29]),
    # enough decodes that the C kernel hands each thread whole sequences (all kv heads in a row)
    "many-decodes": ([1] * 12, [1, 5, 16, 17, 33, 70, 2, 48, 9, 64, 31, 15]),
}
HEADS = [(4, 4, 32), (8, 2, 64), (9, 3, 64)]


def build(query_lens, context_lens, num_kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 5
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered block ids
    tables, slots = [], []
    for q_len, ctx in zip(query_lens, context_lens):
        n = -(-ctx // block_size)
        tables.append(perm[:n])
        perm = perm[n:]
        slots.extend(tables[-1][p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx))
    meta = AttentionMetadata.build(query_lens, context_lens, tables, torch.tensor(slots), block_size, torch.device("cpu"))
    return k_cache, v_cache, meta


def case_id(val):
    return "-".join(map(str, val)) if isinstance(val, tuple) else str(val)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-D{h[2]}")
@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_paged_attention_matches_reference(layout, heads, block_size, dtype):
    query_lens, context_lens = LAYOUTS[layout]
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, meta = build(query_lens, context_lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale)
    actual = paged_attention(q, k_cache, v_cache, meta, scale)
    assert rel_rms(actual, expected) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_reference_equals_dense_causal_attention_after_write_kv():
    """Write a whole sequence's K/V through the slot mapping, attend over the cache: same as
    causal SDPA on the dense tensors."""
    torch.manual_seed(0)
    T, Hq, Hkv, D, bs = 21, 6, 2, 16, 4
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    k_cache, v_cache = torch.zeros(8, bs, Hkv, D), torch.zeros(8, bs, Hkv, D)
    table = [6, 2, 7, 0, 3, 5]
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(T)])
    write_kv(k, v, k_cache, v_cache, slots)
    meta = AttentionMetadata.build([T], [T], [table], slots, bs, torch.device("cpu"))
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    assert rel_rms(paged_attention_reference(q, k_cache, v_cache, meta, D**-0.5), dense) < 1e-6
    assert rel_rms(varlen_attention(q, k, v, [0, T], D**-0.5), dense) < 1e-6


def test_varlen_attention_keeps_sequences_apart():
    torch.manual_seed(1)
    lens = [3, 9, 1]
    q, k, v = torch.randn(13, 4, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    out = varlen_attention(q, k, v, [0, 3, 12, 13], 8**-0.5)
    start = 0
    for n in lens:
        alone = varlen_attention(q[start:start + n], k[start:start + n], v[start:start + n], [0, n], 8**-0.5)
        assert torch.allclose(out[start:start + n], alone)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS + [(16, 4, 128), (4, 4, 48)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-D{h[2]}")
@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_c_decode_kernel_matches_reference(layout, heads, dtype):
    from kernels.attention import c_decode_available, paged_attention_cpu

    if not c_decode_available(dtype):
        pytest.skip("no C compiler: the CPU decode kernel falls back to torch")
    query_lens, context_lens = LAYOUTS[layout]
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, meta = build(query_lens, context_lens, num_kv_heads, head_dim, 16, dtype, seed=3)
    q = torch.randn(sum(query_lens), num_heads, head_dim).to(dtype)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, head_dim**-0.5)
    actual = paged_attention_cpu(q, k_cache, v_cache, meta, head_dim**-0.5)
    assert rel_rms(actual, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_c_decode_kernel_is_built_on_this_machine():
    """CI runs where a C compiler exists; if the build breaks, this fails instead of the
    engine silently falling back to the slower torch path."""
    from kernels.attention import c_decode_available

    assert c_decode_available(torch.bfloat16)


def test_c_decode_path_falls_back_for_a_float16_cache():
    """The C kernel reads fp32 or bf16 buffers only; an fp16 cache must take the torch path
    (it once read past its buffers)."""
    from kernels.attention import paged_attention_cpu

    query_lens, context_lens = LAYOUTS["decodes-only"]
    k_cache, v_cache, meta = build(query_lens, context_lens, 2, 64, 16, torch.float16, seed=4)
    q = torch.randn(sum(query_lens), 4, 64).to(torch.bfloat16)
    got = paged_attention_cpu(q, k_cache, v_cache, meta, 0.125)
    expected = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, 0.125)
    assert rel_rms(got.float(), expected) < 2e-2
