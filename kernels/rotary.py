"""Rotary position embedding, rotate-half layout, optionally partial (first `rot` dims).

    cos_sin cache: (max_positions, rot) float32, row p = [cos(p f_0 .. p f_{rot/2-1}) | sin(...)]
    x1, x2 = first and second half of the rotated dims
    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin
"""

from __future__ import annotations

import torch

from kernels import cpu_ext

_ROPE_ARGS = (cpu_ext.P, cpu_ext.P, cpu_ext.P, cpu_ext.P) + (cpu_ext.I64,) * 7 + (cpu_ext.INT, cpu_ext.INT)


def cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """(max_positions, rot) float32 rows of [cos | sin]."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos/sin (T, R/2) in x.dtype with R <= D: rotate the first R dims."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    out = (x1 * c - x2 * s, x2 * c + x1 * s)
    return torch.cat((*out, rest), dim=-1) if rest.shape[-1] else torch.cat(out, dim=-1)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: q (T, Hq, D), k (T, Hk, D) -> rotated copies. cos/sin are cast to the
    activations' dtype first (as transformers does)."""
    half = cache.shape[1] // 2
    cs = cache[positions].to(q.dtype)
    cos, sin = cs[:, :half], cs[:, half:]
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotary_cpu(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same, IN PLACE on q and k through one C call (they may be strided views of a fused
    projection, heads contiguous within a token); the reference under autograd. Positions
    must be below the table's rows (CausalLM.forward checks once per step)."""
    fn = cpu_ext.function("cpu_ops", "rope", _ROPE_ARGS) if cpu_ext.fast_path_ok(q, k) else None
    head_dim = q.shape[2]
    if (
        fn is None
        or q.dtype != k.dtype
        or q.stride(2) != 1 or k.stride(2) != 1
        or q.stride(1) != head_dim or k.stride(1) != head_dim
        or positions.dtype != torch.int64 or not positions.is_contiguous()
        or cache.dtype != torch.float32 or not cache.is_contiguous()
    ):
        return rotary(q, k, positions, cache)
    fn(q.data_ptr(), k.data_ptr(), positions.data_ptr(), cache.data_ptr(), q.shape[0], q.shape[1], k.shape[1],
       head_dim, cache.shape[1], q.stride(0), k.stride(0), int(q.dtype == torch.bfloat16), torch.get_num_threads())
    return q, k
