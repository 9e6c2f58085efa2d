"""The fused C ops of the CPU path (kernels/csrc/cpu_ops.c) against their torch references."""

import pytest
import torch

from kernels import activation, attention, cpu_ext, norm, rotary
from tests.helpers import rel_rms

pytestmark = pytest.mark.skipif(cpu_ext.load("cpu_ops") is None, reason="no C compiler")
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def tol(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, dim", [(1, 64), (7, 576), (33, 2048)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_x", [True, False], ids=["add", "first-layer"])
def test_add_rms_norm_matches_reference(rows, dim, dtype, with_x):
    g = torch.Generator().manual_seed(rows)
    residual = torch.randn(rows, dim, generator=g) * 30
    x = (torch.randn(rows, dim, generator=g) * 5).to(dtype) if with_x else None
    weight = torch.rand(dim, generator=g) + 0.5
    exp_out, exp_res = norm.add_rms_norm(x, residual.clone(), weight, 1e-5, dtype)
    with torch.no_grad():
        out, res = norm.add_rms_norm_cpu(None if x is None else x.clone(), residual.clone(), weight, 1e-5, dtype)
    assert out.dtype == dtype and res.dtype == torch.float32
    assert rel_rms(res, exp_res) < 1e-7
    assert rel_rms(out, exp_out) < tol(dtype)


def test_add_rms_norm_is_in_place_and_falls_back_under_autograd():
    residual = torch.randn(4, 64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        out, res = norm.add_rms_norm_cpu(x, residual, torch.ones(64), 1e-6, torch.float32)
    assert out.data_ptr() == x.data_ptr() and res.data_ptr() == residual.data_ptr()
    w = torch.ones(64, requires_grad=True)
    out, _ = norm.add_rms_norm_cpu(torch.randn(4, 64), torch.randn(4, 64), w, 1e-6, torch.float32)
    out.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, inter", [(1, 128), (17, 1536)], ids=lambda v: str(v))
def test_silu_and_mul_matches_reference(rows, inter, dtype):
    gate_up = (torch.randn(rows, 2 * inter) * 3).to(dtype)
    with torch.no_grad():
        assert rel_rms(activation.silu_and_mul_cpu(gate_up), activation.silu_and_mul(gate_up)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("hq, hk, head_dim, rot", [(4, 2, 64, 64), (9, 3, 64, 64), (8, 2, 128, 32)],
                         ids=lambda v: str(v))
def test_rotary_in_place_on_strided_views_matches_reference(hq, hk, head_dim, rot, dtype):
    tokens = 11
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    positions = torch.tensor([0, 1, 2, 5, 9, 100, 3, 4, 7, 8, 1000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    cache = rotary.cos_sin_cache(inv_freq, 2048)
    exp_q, exp_k = rotary.rotary(q.clone(), k.clone(), positions, cache)
    v_before = qkv[:, (hq + hk) * head_dim :].clone()
    with torch.no_grad():
        got_q, got_k = rotary.rotary_cpu(q, k, positions, cache)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    assert rel_rms(got_q, exp_q) < tol(dtype) and rel_rms(got_k, exp_k) < tol(dtype)
    assert torch.equal(qkv[:, (hq + hk) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_write_kv_from_strided_views_matches_reference(dtype):
    tokens, hk, d = 9, 3, 64
    qkv = torch.randn(tokens, (3 + 2 * hk) * d).to(dtype)
    k = qkv[:, 3 * d : (3 + hk) * d].view(tokens, hk, d)
    v = qkv[:, (3 + hk) * d :].view(tokens, hk, d)
    slots = torch.tensor([5, 0, 17, 3, 31, 8, 9, 10, 22])
    caches = [torch.zeros(4, 8, hk, d, dtype=dtype) for _ in range(4)]
    attention.write_kv_reference(k, v, caches[0], caches[1], slots)
    with torch.no_grad():
        attention.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
