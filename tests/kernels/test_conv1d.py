"""Causal depthwise conv1d with carried state: the fast path, the C kernels (prefill, and the
decode step in place in a state pool), the decode step and transformers' Qwen3.5 functions all
agree with the per-token reference loop; gradients flow through the prefill form."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.conv1d import (
    causal_conv1d,
    causal_conv1d_cpu,
    causal_conv1d_update,
    conv1d_decode,
    conv1d_decode_cpu,
    naive_causal_conv1d,
)
from tests.helpers import rel_rms

FP32_TOL = 1e-6
BF16_TOL = 1e-2


@dataclass(frozen=True)
class Shape:
    lengths: tuple[int, ...]
    channels: int
    kernel_width: int

    @property
    def id(self) -> str:
        return f"N{len(self.lengths)}-T{sum(self.lengths)}-C{self.channels}-K{self.kernel_width}"


SHAPES = [
    Shape((1,), 8, 4),  # a single token
    Shape((1, 2, 3, 4), 16, 4),  # shorter than, equal to and just past K-1
    Shape((33, 1, 70), 24, 4),  # the Qwen3.5 kernel width
    Shape((5, 17), 12, 2),
    Shape((6, 1), 8, 1),  # K = 1: no state at all
]
SHAPE_PARAMS = [pytest.param(shape, id=shape.id) for shape in SHAPES]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
WITH_STATE = [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")]
ACTIVATIONS = [pytest.param("silu", id="silu"), pytest.param(None, id="no-act")]


@dataclass
class Inputs:
    x: torch.Tensor  # (T, C)
    weight: torch.Tensor  # (C, K)
    cu_seqlens: torch.Tensor  # (N+1,) int64
    initial_state: torch.Tensor | None  # (N, C, K-1)


def make_inputs(shape: Shape, dtype: torch.dtype, with_state: bool, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    num_seqs, channels, width = len(shape.lengths), shape.channels, shape.kernel_width
    initial_state = torch.randn(num_seqs, channels, width - 1, generator=gen).to(dtype) if with_state else None
    return Inputs(
        x=torch.randn(sum(shape.lengths), channels, generator=gen).to(dtype),
        weight=(torch.randn(channels, width, generator=gen) * width**-0.5).to(dtype),
        cu_seqlens=F.pad(torch.tensor(shape.lengths, dtype=torch.int64).cumsum(0), (1, 0)),
        initial_state=initial_state,
    )


def start_states(inputs: Inputs) -> torch.Tensor:
    if inputs.initial_state is not None:
        return inputs.initial_state
    num_seqs = inputs.cu_seqlens.numel() - 1
    return inputs.x.new_zeros(num_seqs, inputs.x.shape[1], inputs.weight.shape[1] - 1)


def tolerance(dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_fast_matches_naive(shape, dtype, with_state, activation):
    inputs = make_inputs(shape, dtype, with_state)
    args = (inputs.x, inputs.weight, inputs.cu_seqlens, inputs.initial_state, activation)
    expected_out, expected_state = naive_causal_conv1d(*args)
    out, state = causal_conv1d(*args)
    assert out.dtype == dtype and out.shape == inputs.x.shape
    assert state.shape == (len(shape.lengths), shape.channels, shape.kernel_width - 1)
    assert rel_rms(out, expected_out) < tolerance(dtype)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)  # states are copies of inputs


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_update_step_by_step_matches_full_sequence(shape, dtype, with_state):
    """Decode every sequence one token per step, batching the sequences that still have one."""
    inputs = make_inputs(shape, dtype, with_state)
    expected_out, expected_state = naive_causal_conv1d(inputs.x, inputs.weight, inputs.cu_seqlens, inputs.initial_state)

    starts, ends = inputs.cu_seqlens[:-1].tolist(), inputs.cu_seqlens[1:].tolist()
    states = start_states(inputs).clone()
    out = torch.empty_like(inputs.x)
    for step in range(max(shape.lengths)):
        active = [n for n, (start, end) in enumerate(zip(starts, ends)) if start + step < end]
        rows, tokens = torch.tensor(active), torch.tensor([starts[n] + step for n in active])
        out[tokens], states[rows] = causal_conv1d_update(inputs.x[tokens], inputs.weight, states[rows])

    assert rel_rms(out, expected_out) < tolerance(dtype)
    torch.testing.assert_close(states, expected_state, rtol=0, atol=0)


def test_short_sequence_keeps_the_older_state_entries():
    """With K-1 = 3 and 1 new token, the new state is [s1, s2, x0]: s0 drops out."""
    weight = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])  # (C=1, K=4): reads each input apart
    state = torch.tensor([[[1.0, 2.0, 3.0]]])  # (N=1, C=1, K-1=3)
    x = torch.tensor([[4.0]])  # (T=1, C=1)
    cu_seqlens = torch.tensor([0, 1])
    for conv in (causal_conv1d, naive_causal_conv1d):
        out, new_state = conv(x, weight, cu_seqlens, state, activation=None)
        assert out.tolist() == [[1.0 + 20.0 + 300.0 + 4000.0]]
        assert new_state.tolist() == [[[2.0, 3.0, 4.0]]]
    out, new_state = causal_conv1d_update(x, weight, state, activation=None)
    assert out.tolist() == [[4321.0]]
    assert new_state.tolist() == [[[2.0, 3.0, 4.0]]]


def test_two_token_sequences_carry_state_across_calls():
    """Prefill 2 tokens, then 2 more, with K-1 = 3 > 2: the same as 4 tokens at once."""
    inputs = make_inputs(Shape((4, 4), 6, 4), torch.float32, with_state=True)
    full_out, full_state = causal_conv1d(inputs.x, inputs.weight, inputs.cu_seqlens, inputs.initial_state)
    first, second = torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])
    halves = torch.tensor([0, 2, 4])
    out_1, state_1 = causal_conv1d(inputs.x[first], inputs.weight, halves, inputs.initial_state)
    out_2, state_2 = causal_conv1d(inputs.x[second], inputs.weight, halves, state_1)
    assert rel_rms(out_1, full_out[first]) < FP32_TOL
    assert rel_rms(out_2, full_out[second]) < FP32_TOL
    torch.testing.assert_close(state_2, full_state, rtol=0, atol=0)


@pytest.mark.parametrize("conv", [causal_conv1d, naive_causal_conv1d])
def test_does_not_mutate_inputs(conv):
    inputs = make_inputs(SHAPES[2], torch.float32, with_state=True)
    before = [inputs.x.clone(), inputs.weight.clone(), inputs.initial_state.clone()]
    conv(inputs.x, inputs.weight, inputs.cu_seqlens, inputs.initial_state)
    for tensor, original in zip([inputs.x, inputs.weight, inputs.initial_state], before):
        torch.testing.assert_close(tensor, original, rtol=0, atol=0)


def test_update_does_not_mutate_state():
    inputs = make_inputs(Shape((1, 1), 8, 4), torch.float32, with_state=True)
    state = inputs.initial_state.clone()
    causal_conv1d_update(inputs.x, inputs.weight, state)
    torch.testing.assert_close(state, inputs.initial_state, rtol=0, atol=0)


def test_rejects_unknown_activation():
    inputs = make_inputs(SHAPES[0], torch.float32, with_state=False)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(inputs.x, inputs.weight, inputs.cu_seqlens, None, activation="gelu")


# --- transformers' Qwen3.5 torch implementation -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_matches_transformers_causal_conv1d_fn(shape, dtype):
    """transformers convolves one (B, C, L) batch from zeros; compare sequence by sequence."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn

    inputs = make_inputs(shape, dtype, with_state=False)
    out, _ = causal_conv1d(inputs.x, inputs.weight, inputs.cu_seqlens, None, activation="silu")
    bounds = inputs.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        sequence = inputs.x[start:end].T[None]  # (1, C, L)
        expected = causal_conv1d_fn(sequence, inputs.weight, None, activation="silu")[0].T  # (L, C)
        assert rel_rms(out[start:end], expected) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_update_matches_transformers_causal_conv1d_update(shape, dtype):
    """transformers updates its (N, C, state_len) conv state in place; ours returns a new one.

    transformers' cache keeps K inputs (state_len = K), one more than the maths reads: with a
    K-long cache the oldest entry drops out of the output, and our state is cache[..., 1:].
    """
    from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_update as hf_update

    inputs = make_inputs(Shape((1,) * len(shape.lengths), shape.channels, shape.kernel_width), dtype, True)
    out, state = causal_conv1d_update(inputs.x, inputs.weight, inputs.initial_state, activation="silu")

    for oldest in (None, torch.randn(len(shape.lengths), shape.channels, 1).to(dtype)):
        hf_state = inputs.initial_state.clone() if oldest is None else torch.cat([oldest, inputs.initial_state], -1)
        expected = hf_update(inputs.x[:, :, None], hf_state, inputs.weight, None, "silu")[:, :, 0]  # (N, C)
        assert rel_rms(out, expected) < tolerance(dtype)
        newest = hf_state[..., hf_state.shape[-1] - state.shape[-1] :]
        torch.testing.assert_close(state, newest, rtol=0, atol=0)


# --- the C kernels (kernels/csrc/linear_attention.c) ------------------------------------------


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a row-strided view, as the model passes a slice of a fused projection."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 7, dtype=x.dtype)
    wide[:, 3 : 3 + x.shape[1]] = x
    return wide[:, 3 : 3 + x.shape[1]]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPE_PARAMS, pytest.param(Shape((0, 3, 0), 300, 4), id="N3-T3-C300-K4-empty")])
def test_cpu_prefill_matches_naive(shape, dtype, with_state, activation):
    inputs = make_inputs(shape, dtype, with_state)
    expected_out, expected_state = naive_causal_conv1d(
        inputs.x, inputs.weight, inputs.cu_seqlens, inputs.initial_state, activation
    )
    with torch.inference_mode():  # the C path runs without autograd only
        out, state = causal_conv1d_cpu(strided(inputs.x), inputs.weight, inputs.cu_seqlens, inputs.initial_state, activation)
    assert out.dtype == dtype and out.shape == inputs.x.shape
    assert rel_rms(out, expected_out) < tolerance(dtype)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_width", [1, 2, 4])
def test_cpu_decode_updates_only_its_slots_in_the_pool(dtype, kernel_width):
    gen = torch.Generator().manual_seed(3)
    channels, num_slots = 40, 9
    x = torch.randn(4, channels, generator=gen).to(dtype)
    weight = torch.randn(channels, kernel_width, generator=gen).to(dtype)
    pool = torch.randn(num_slots, channels, kernel_width - 1, generator=gen).to(dtype)
    slots = torch.tensor([7, 0, 3, 5])
    expected_pool = pool.clone()
    expected = conv1d_decode(x, weight, expected_pool, slots)
    with torch.inference_mode():
        out = conv1d_decode_cpu(strided(x), weight, pool, slots)
    assert rel_rms(out, expected) < tolerance(dtype)
    torch.testing.assert_close(pool, expected_pool, rtol=0, atol=0)  # moved inputs, no arithmetic


def test_prefill_gradients_match_naive():
    """Training runs the prefill form under autograd (LoRA on the projections feeding it)."""
    inputs = make_inputs(Shape((33, 1, 0, 70), 24, 4), torch.float32, with_state=True)
    grads = []
    for conv in (naive_causal_conv1d, causal_conv1d):
        x, weight, state = (t.clone().requires_grad_() for t in (inputs.x, inputs.weight, inputs.initial_state))
        out, final = conv(x, weight, inputs.cu_seqlens, state)
        (out.sin().sum() + final.cos().sum()).backward()
        grads.append([x.grad, weight.grad, state.grad])
    for fast, reference in zip(*grads):  # float32 sums in another order
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
