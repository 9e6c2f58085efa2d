"""Argmax over the last dim of (rows, vocab) scores: greedy decoding and the sampler's
exponential race. torch's CPU argmax reads ~0.25 G elements/s per thread, which at 32 rows
of a 49k vocabulary is ~6 ms a step; the C kernel (csrc/cpu_ops.c) streams them at memory
speed."""

from __future__ import annotations

import torch

from kernels import cpu_ext

_ARGMAX_ARGS = (cpu_ext.P, cpu_ext.P, cpu_ext.I64, cpu_ext.I64, cpu_ext.INT, cpu_ext.INT)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores (R, V) -> (R,) int64, the first index of each row's maximum. The reference."""
    return scores.argmax(dim=-1)


def argmax_cpu(scores: torch.Tensor) -> torch.Tensor:
    """Same through the C kernel for contiguous 2-D float32/bf16 scores on CPU (NaNs are
    skipped rather than chosen); else the reference."""
    fn = cpu_ext.function("cpu_ops", "argmax_rows", _ARGMAX_ARGS) if cpu_ext.fast_path_ok(scores) else None
    if fn is None or scores.dim() != 2 or not scores.is_contiguous() or scores.shape[1] == 0:
        return argmax(scores)
    rows, cols = scores.shape
    out = torch.empty(rows, dtype=torch.int64)
    fn(scores.data_ptr(), out.data_ptr(), rows, cols, int(scores.dtype == torch.bfloat16), torch.get_num_threads())
    return out
