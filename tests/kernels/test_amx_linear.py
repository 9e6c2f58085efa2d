"""The plain-weight projection kernels, AMX (kernels/csrc/amx_linear.c) and AVX512-BF16
(csrc/avx512_linear.c), against fp32 math on the same bf16 inputs rounded to bf16 once, as
F.linear defines it."""

import pytest
import torch
import torch.nn.functional as F

from kernels import linear
from tests.helpers import rel_rms

CPU, BF16 = torch.device("cpu"), torch.bfloat16
needs_amx = pytest.mark.skipif(
    not linear.amx_available(CPU, BF16),
    reason="no AMX here (needs amx_tile + amx_bf16, Linux granting the tile state, and a C compiler)",
)
needs_avx512 = pytest.mark.skipif(not linear.avx512_available(CPU, BF16), reason="no AVX512-BF16 here")

# (tokens T, in_features K, out_features N, bias): SmolLM2-135M's projections (qkv, o, gate_up,
# down) and its tied output head (no bias), tails of K (not a multiple of 32) and N (not of 16),
# tiles smaller than 16 x 32.
TOKENS = (1, 3, 16, 17, 64, 300)
CASES = (
    [(t, k, n, b) for k, n in ((576, 960), (576, 576), (576, 3072), (1536, 576), (100, 37)) for t in TOKENS
     for b in (False, True)]
    + [(t, 576, 49152, False) for t in (1, 64)]
    + [(5, 30, 7, True), (33, 64, 4, False), (20, 32, 16, True)]
)
# no head for AVX512 (slow to check, nothing tile-specific); any K, odd or below 32
AVX512_CASES = [c for c in CASES if c[2] != 49152] + [(7, 31, 16, True), (2, 7, 3, False)]


def case_ids(cases):
    return [f"T{t}-K{k}-N{n}{'-bias' if b else ''}" for t, k, n, b in cases]


TOL = 1e-3  # one bf16 rounding of a float32 sum, as the reference; another summation order
# flips a few of those roundings by one unit (observed: < 1e-4)


def inputs(tokens: int, k: int, n: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    weight = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, weight, b


def fp32_reference(x, weight, bias):
    out = x.float() @ weight.float().T
    return (out if bias is None else out + bias.float()).bfloat16()


@needs_amx
@pytest.mark.parametrize("tokens, k, n, bias", CASES, ids=case_ids(CASES))
def test_amx_linear_matches_fp32_math(tokens, k, n, bias):
    x, weight, b = inputs(tokens, k, n, bias)
    out = linear.amx_linear(x, weight, b)
    assert out is not None, "the kernel refused a shape it should take"
    assert out.shape == (tokens, n) and out.dtype == torch.bfloat16
    assert rel_rms(out, fp32_reference(x, weight, b)) < TOL


@needs_amx
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("tokens, n", [(1, 37), (1, 133), (17, 133), (1, 3072), (17, 960), (300, 576)])
def test_amx_linear_hands_out_every_row_block_once_whatever_the_thread_count(threads, tokens, n):
    """Row tiles go to the threads in blocks claimed on the fly: with any number of threads,
    more threads than blocks included, every output row is written once and right."""
    x, weight, _ = inputs(tokens, 576, n, False, seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = linear.amx_linear(x, weight, None)
    finally:
        torch.set_num_threads(before)
    assert out is not None
    assert rel_rms(out, fp32_reference(x, weight, None)) < TOL


@needs_amx
def test_amx_linear_reads_strided_rows_in_place():
    """A weight whose rows are 320 elements apart and x rows 200 apart (slices of wider
    tensors): the kernel reads both where they lie."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(40, 320, generator=g) / 13).bfloat16()[:, :160]
    x = torch.randn(9, 200, generator=g).bfloat16()[:, :160]
    out = linear.amx_linear(x, weight, None)
    assert out is not None
    assert rel_rms(out, fp32_reference(x, weight, None)) < TOL


@needs_amx
def test_amx_linear_keeps_leading_dims_and_refuses_what_it_cannot_take():
    x, weight, b = inputs(6, 64, 48, True)
    out = linear.amx_linear(x.view(2, 3, 64), weight, b)
    assert out.shape == (2, 3, 48)
    assert rel_rms(out.view(6, 48), fp32_reference(x, weight, b)) < TOL
    assert linear.amx_linear(x.float(), weight.float(), None) is None  # float32: F.linear's job
    odd_x, odd_w, _ = inputs(4, 31, 16, False)
    assert linear.amx_linear(odd_x, odd_w, None) is None  # K < 32 and odd


@needs_amx
def test_linear_uses_the_kernel_without_grad_and_f_linear_with_grad():
    x, weight, b = inputs(5, 576, 960, True)
    with torch.no_grad():
        fast = linear.linear(x, weight, b, None)
    assert torch.equal(fast, linear.amx_linear(x, weight, b))
    w = weight.clone().requires_grad_(True)
    out = linear.linear(x, w, b, None)
    assert torch.equal(out, F.linear(x, w, b))
    out.float().sum().backward()
    assert w.grad is not None
    odd_x, odd_w, _ = inputs(4, 31, 16, False)  # the AMX kernel refuses: the next path answers
    with torch.no_grad():
        assert rel_rms(linear.linear(odd_x, odd_w, None, None), fp32_reference(odd_x, odd_w, None)) < TOL


@needs_avx512
@pytest.mark.parametrize("tokens, k, n, bias", AVX512_CASES, ids=case_ids(AVX512_CASES))
def test_avx512_linear_matches_fp32_math(tokens, k, n, bias):
    """The plain-weight path of CPUs without AMX (vdpbf16ps): the same table, and odd K."""
    x, weight, b = inputs(tokens, k, n, bias)
    out = linear.avx512_linear(x, weight, b)
    assert out.shape == (tokens, n) and out.dtype == torch.bfloat16
    assert rel_rms(out, fp32_reference(x, weight, b)) < TOL
