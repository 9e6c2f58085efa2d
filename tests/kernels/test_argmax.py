"""The C argmax (greedy decoding, the sampler's exponential race) against torch.argmax."""

import pytest
import torch

from kernels.argmax import argmax, argmax_cpu

SHAPES = [(1, 49152), (32, 49152), (3, 37), (5, 16), (2, 1), (7, 151669)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"R{s[0]}-V{s[1]}")
def test_argmax_equals_torch(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    scores = (torch.randn(shape, generator=g) * 4).to(dtype)
    assert torch.equal(argmax_cpu(scores), argmax(scores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ties_take_the_first_index_and_masked_tokens_never_win(dtype):
    scores = torch.full((4, 100), float("-inf"), dtype=dtype)
    scores[0, [17, 40, 99]] = 3.0            # a tie across vector lanes and the scalar tail
    scores[1, [5, 21]] = 1.0                  # a tie within the first vector
    scores[2, 97] = -1e30                     # the only finite score, in the tail
    # row 3: all -inf -> index 0, as torch
    assert argmax_cpu(scores).tolist() == argmax(scores).tolist() == [17, 5, 97, 0]


def test_strided_or_autograd_input_takes_the_reference():
    scores = torch.randn(6, 64)[:, ::2]
    assert torch.equal(argmax_cpu(scores), argmax(scores))
