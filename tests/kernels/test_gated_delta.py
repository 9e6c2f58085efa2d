"""The gated delta rule: chunked prefill (also its gradients), recurrent decode (also the C
kernel updating states in place in a pool) and transformers' Qwen3.5 code all agree with the
per-token reference loop."""

import functools
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from kernels.gated_delta import (
    chunk_gated_delta_rule,
    gated_delta_decode,
    gated_delta_decode_cpu,
    gated_delta_prefill,
    gated_delta_prefill_cpu,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from tests.helpers import rel_rms

CHUNK_SIZE = 64
FP32_TOL = 1e-5
BF16_TOL = 2e-2


@dataclass(frozen=True)
class Shape:
    lengths: tuple[int, ...]
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int

    @property
    def id(self) -> str:
        return (
            f"N{len(self.lengths)}-T{sum(self.lengths)}-Hk{self.key_heads}-Hv{self.value_heads}"
            f"-Dk{self.key_dim}-Dv{self.value_dim}"
        )


SHAPES = [
    Shape((1,), 2, 2, 16, 16),  # a single token
    Shape((5, 1, 27), 2, 4, 16, 32),  # all shorter than a chunk
    Shape((CHUNK_SIZE,), 1, 1, 32, 32),  # exactly one chunk
    Shape((CHUNK_SIZE, 2 * CHUNK_SIZE + 2, 1, 40), 2, 4, 16, 32),  # chunk, chunks + remainder, ...
    Shape((3 * CHUNK_SIZE + 7, 9), 1, 2, 128, 64),  # Qwen3.5-like head dims
]
SHAPE_PARAMS = [pytest.param(shape, id=shape.id) for shape in SHAPES]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
WITH_STATE = [pytest.param(False, id="zero-state"), pytest.param(True, id="initial-state")]


@dataclass
class Inputs:
    q: torch.Tensor  # (T, Hk, Dk), L2-normalised
    k: torch.Tensor  # (T, Hk, Dk), L2-normalised
    v: torch.Tensor  # (T, Hv, Dv)
    g: torch.Tensor  # (T, Hv) float32, <= 0
    beta: torch.Tensor  # (T, Hv), in (0, 1)
    cu_seqlens: torch.Tensor  # (N+1,) int64
    initial_state: torch.Tensor | None  # (N, Hv, Dk, Dv) float32
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.g, self.beta, self.cu_seqlens, self.initial_state, self.scale)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """The normalisation of transformers' `l2norm` (and fla): x / sqrt(sum(x^2) + 1e-6)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + 1e-6)


def make_inputs(shape: Shape, dtype: torch.dtype, with_state: bool, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    total, hk, hv, dk, dv = sum(shape.lengths), shape.key_heads, shape.value_heads, shape.key_dim, shape.value_dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    # Heads forget at different rates, so some carry the state across many chunks.
    head_rate = torch.logspace(-2, 0, hv)
    cu_seqlens = F.pad(torch.tensor(shape.lengths, dtype=torch.int64).cumsum(0), (1, 0))
    initial_state = randn(len(shape.lengths), hv, dk, dv) if with_state else None
    return Inputs(
        q=l2_normalise(randn(total, hk, dk)).to(dtype),
        k=l2_normalise(randn(total, hk, dk)).to(dtype),
        v=randn(total, hv, dv).to(dtype),
        g=-F.softplus(randn(total, hv)) * head_rate,
        beta=torch.sigmoid(randn(total, hv)).to(dtype),
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        scale=dk**-0.5,
    )


@functools.cache
def naive_reference(shape: Shape, dtype: torch.dtype, with_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_gated_delta_rule` on `make_inputs(shape, dtype, with_state)`, computed once per session."""
    return naive_gated_delta_rule(*make_inputs(shape, dtype, with_state).args())


def tolerance(dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def decode_token_by_token(inputs: Inputs, states: torch.Tensor, first_tokens: list[int]):
    """Run `recurrent_gated_delta_rule` from token first_tokens[n] to the end of each sequence n,
    one step at a time, batching every sequence that still has a token at that step.
    Returns (out (T, Hv, Dv), final states); rows of out before first_tokens are zeros."""
    ends = inputs.cu_seqlens[1:].tolist()
    states = states.clone()
    out = torch.zeros_like(inputs.v)
    for step in range(max(end - first for first, end in zip(first_tokens, ends))):
        active = [n for n, (first, end) in enumerate(zip(first_tokens, ends)) if first + step < end]
        rows = torch.tensor(active)
        tokens = torch.tensor([first_tokens[n] + step for n in active])
        out[tokens], states[rows] = recurrent_gated_delta_rule(
            inputs.q[tokens], inputs.k[tokens], inputs.v[tokens], inputs.g[tokens], inputs.beta[tokens],
            states[rows], inputs.scale,
        )
    return out, states


def start_states(inputs: Inputs) -> torch.Tensor:
    """The initial states, with None spelled out as zeros (the recurrent step needs a tensor)."""
    if inputs.initial_state is not None:
        return inputs.initial_state
    num_seqs = inputs.cu_seqlens.numel() - 1
    return torch.zeros(num_seqs, inputs.v.shape[1], inputs.k.shape[2], inputs.v.shape[2])


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_chunk_matches_naive(shape, dtype, with_state):
    inputs = make_inputs(shape, dtype, with_state)
    expected_out, expected_state = naive_reference(shape, dtype, with_state)
    out, state = chunk_gated_delta_rule(*inputs.args(), chunk_size=CHUNK_SIZE)
    assert out.dtype == dtype and out.shape == expected_out.shape
    assert state.dtype == torch.float32 and state.shape == expected_state.shape
    assert rel_rms(out, expected_out) < tolerance(dtype)
    assert rel_rms(state, expected_state) < tolerance(dtype)


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_recurrent_steps_match_naive(shape, dtype, with_state):
    inputs = make_inputs(shape, dtype, with_state)
    expected_out, expected_state = naive_reference(shape, dtype, with_state)
    out, state = decode_token_by_token(inputs, start_states(inputs), inputs.cu_seqlens[:-1].tolist())
    assert rel_rms(out, expected_out) < tolerance(dtype)
    assert rel_rms(state, expected_state) < tolerance(dtype)


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_chunk_prefill_then_recurrent_decode_matches_naive(shape, with_state):
    """The serving hand-over: prefill a prefix of every sequence, then decode the rest."""
    inputs = make_inputs(shape, torch.float32, with_state)
    expected_out, expected_state = naive_reference(shape, torch.float32, with_state)

    starts = inputs.cu_seqlens[:-1].tolist()
    prefix_lengths = [(length + 1) // 2 for length in shape.lengths]
    prefix_tokens = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, prefix_lengths)])
    prefix_cu_seqlens = F.pad(torch.tensor(prefix_lengths).cumsum(0), (1, 0))
    prefix_out, prefill_state = chunk_gated_delta_rule(
        inputs.q[prefix_tokens], inputs.k[prefix_tokens], inputs.v[prefix_tokens], inputs.g[prefix_tokens],
        inputs.beta[prefix_tokens], prefix_cu_seqlens, inputs.initial_state, inputs.scale, chunk_size=CHUNK_SIZE,
    )
    decode_out, state = decode_token_by_token(
        inputs, prefill_state, [s + n for s, n in zip(starts, prefix_lengths)]
    )
    out = decode_out.clone()
    out[prefix_tokens] = prefix_out
    assert rel_rms(out, expected_out) < FP32_TOL
    assert rel_rms(state, expected_state) < FP32_TOL


def test_chunk_result_does_not_depend_on_chunk_size():
    """Small chunks also make the 130-token sequence span several windows of chunks."""
    inputs = make_inputs(SHAPES[3], torch.float32, with_state=True)
    expected_out, expected_state = naive_reference(SHAPES[3], torch.float32, with_state=True)
    for chunk_size in (1, 16, 32, 128):
        out, state = chunk_gated_delta_rule(*inputs.args(), chunk_size=chunk_size)
        assert rel_rms(out, expected_out) < FP32_TOL, chunk_size
        assert rel_rms(state, expected_state) < FP32_TOL, chunk_size


def test_empty_sequence_passes_its_state_through():
    inputs = make_inputs(Shape((0, 5), 1, 1, 8, 8), torch.float32, with_state=True)
    for rule in (naive_gated_delta_rule, chunk_gated_delta_rule):
        out, state = rule(*inputs.args())
        assert out.shape == (5, 1, 8)
        torch.testing.assert_close(state[0], inputs.initial_state[0], rtol=0, atol=0)


@pytest.mark.parametrize("rule", [naive_gated_delta_rule, chunk_gated_delta_rule])
def test_does_not_mutate_inputs_and_returns_fresh_state(rule):
    inputs = make_inputs(SHAPES[1], torch.float32, with_state=True)
    before = [x.clone() for x in inputs.args()[:-1]]
    _, state = rule(*inputs.args())
    for x, original in zip(inputs.args()[:-1], before):
        torch.testing.assert_close(x, original, rtol=0, atol=0)
    assert state.data_ptr() != inputs.initial_state.data_ptr()


def test_recurrent_does_not_mutate_state():
    inputs = make_inputs(Shape((1, 1, 1), 2, 4, 16, 32), torch.float32, with_state=True)
    state = inputs.initial_state.clone()
    _, new_state = recurrent_gated_delta_rule(
        inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, state, inputs.scale
    )
    torch.testing.assert_close(state, inputs.initial_state, rtol=0, atol=0)
    assert new_state.data_ptr() != state.data_ptr()


def test_chunk_matches_naive_when_decays_underflow():
    """Fast-forgetting heads: cumulative log-decays far below -80 within a chunk, where the
    chunked form clamps its exponents (exp(-80) ~ 2e-35 stands in for 0)."""
    inputs = make_inputs(SHAPES[3], torch.float32, with_state=True)
    inputs = replace(inputs, g=inputs.g * 200)
    expected_out, expected_state = naive_gated_delta_rule(*inputs.args())
    out, state = chunk_gated_delta_rule(*inputs.args(), chunk_size=CHUNK_SIZE)
    assert rel_rms(out, expected_out) < FP32_TOL
    assert rel_rms(state, expected_state) < FP32_TOL


def differentiable_reference(q, k, v, g, beta, cu_seqlens, initial_state, scale):
    """The recurrence token by token through `recurrent_gated_delta_rule`, out of place
    throughout (the naive loop writes into its buffers, which autograd cannot follow)."""
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = initial_state[seq : seq + 1]
        for t in range(start, end):
            step = slice(t, t + 1)
            out, state = recurrent_gated_delta_rule(q[step], k[step], v[step], g[step], beta[step], state, scale)
            outs.append(out)
        finals.append(state)
    return torch.cat(outs), torch.cat(finals)


def test_chunk_gradients_match_a_token_by_token_reference():
    """Training backpropagates through the chunked form (LoRA on the projections feeding it)."""
    inputs = make_inputs(Shape((20, 0, 37, 1), 1, 2, 8, 8), torch.float32, with_state=True)
    grads = []
    for rule, extra in ((differentiable_reference, {}), (chunk_gated_delta_rule, {"chunk_size": 16})):
        leaves = [t.clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.initial_state)]
        q, k, v, g, beta, state = leaves
        out, final = rule(q, k, v, g, beta, inputs.cu_seqlens, state, inputs.scale, **extra)
        (out.sin().sum() + final.cos().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, fast, reference in zip("q k v g beta state".split(), *grads):
        assert rel_rms(fast, reference) < FP32_TOL, name


@pytest.mark.parametrize("qk_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [pytest.param(Shape((1,) * 5, 2, 4, 16, 32), id="N5-Hk2-Hv4-Dk16-Dv32"),
              pytest.param(Shape((1,) * 3, 1, 2, 128, 64), id="N3-Hk1-Hv2-Dk128-Dv64")]
)
def test_cpu_decode_updates_its_slots_in_place(shape, dtype, qk_dtype):
    """The C step on states in pool rows `slots` == the torch step on the gathered rows; other
    rows are untouched. v comes as a view into a wider row (a fused projection's output)."""
    inputs = make_inputs(shape, dtype, with_state=False)
    n, hv, dv = inputs.v.shape
    wide = torch.zeros(n, hv * dv + 5, dtype=dtype)
    wide[:, 5:] = inputs.v.reshape(n, -1)
    v = wide[:, 5:].view(n, hv, dv)
    q, k = inputs.q.to(qk_dtype), inputs.k.to(qk_dtype)
    pool = torch.randn(n + 4, hv, shape.key_dim, dv, generator=torch.Generator().manual_seed(1))
    slots = torch.randperm(n + 4, generator=torch.Generator().manual_seed(2))[:n]
    expected_pool = pool.clone()
    expected = gated_delta_decode(q, k, v, inputs.g, inputs.beta, expected_pool, slots, inputs.scale)
    with torch.inference_mode():  # the C path runs without autograd only
        out = gated_delta_decode_cpu(q, k, v, inputs.g, inputs.beta, pool, slots, inputs.scale)
    assert out.dtype == dtype
    assert rel_rms(out, expected) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert rel_rms(pool[slots], expected_pool[slots]) < FP32_TOL
    others = torch.ones(n + 4, dtype=torch.bool)
    others[slots] = False
    torch.testing.assert_close(pool[others], expected_pool[others], rtol=0, atol=0)


@pytest.mark.parametrize("qk_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS + [pytest.param(Shape((0, 9, 0), 2, 4, 16, 32), id="N3-T9-empty")])
def test_cpu_prefill_updates_its_slots_in_place(shape, dtype, qk_dtype):
    """The C recurrence over packed sequences, from and into pool rows `slots`, == the
    reference loop on the gathered rows; other rows are untouched."""
    inputs = make_inputs(shape, dtype, with_state=False)
    q, k = inputs.q.to(qk_dtype), inputs.k.to(qk_dtype)
    n, hv, dv = len(shape.lengths), shape.value_heads, shape.value_dim
    pool = torch.randn(n + 3, hv, shape.key_dim, dv, generator=torch.Generator().manual_seed(1))
    slots = torch.randperm(n + 3, generator=torch.Generator().manual_seed(2))[:n]
    expected_pool = pool.clone()
    expected = gated_delta_prefill(q, k, inputs.v, inputs.g, inputs.beta, inputs.cu_seqlens, expected_pool, slots,
                                   inputs.scale, rule=naive_gated_delta_rule)
    with torch.inference_mode():  # the C path runs without autograd only
        out = gated_delta_prefill_cpu(q, k, inputs.v, inputs.g, inputs.beta, inputs.cu_seqlens, pool, slots, inputs.scale)
    assert out.dtype == dtype and out.shape == inputs.v.shape
    assert rel_rms(out, expected) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert rel_rms(pool[slots], expected_pool[slots]) < FP32_TOL
    others = torch.ones(n + 3, dtype=torch.bool)
    others[slots] = False
    torch.testing.assert_close(pool[others], expected_pool[others], rtol=0, atol=0)


def test_cpu_kernels_refuse_slots_outside_the_pool():
    inputs = make_inputs(Shape((1, 1), 1, 1, 8, 8), torch.float32, with_state=False)
    pool = torch.zeros(2, 1, 8, 8)
    for slots in (torch.tensor([0, 2]), torch.tensor([-1, 0]), torch.tensor([1, 1])):
        with torch.inference_mode(), pytest.raises(IndexError, match="state slots"):
            gated_delta_decode_cpu(inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, pool, slots, inputs.scale)
        with torch.inference_mode(), pytest.raises(IndexError, match="state slots"):
            gated_delta_prefill_cpu(inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.cu_seqlens, pool, slots,
                                    inputs.scale)


def test_cpu_prefill_never_runs_c_on_cu_seqlens_that_do_not_cover_the_tokens():
    """The C loop trusts cu_seqlens to index the tokens; the guard refuses any that do not."""
    from kernels.gated_delta import _gated_delta_cpu

    inputs = make_inputs(Shape((3, 4), 1, 2, 8, 8), torch.float32, with_state=False)
    pool, slots = torch.zeros(2, 2, 8, 8), torch.tensor([0, 1])
    args = (inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta)
    with torch.inference_mode():
        assert _gated_delta_cpu(*args, inputs.cu_seqlens, pool, slots, inputs.scale) is not None
        for cu in ([0, 3, 9], [1, 3, 7], [0, 5, 3, 7][:3], [0, 7]):
            assert _gated_delta_cpu(*args, torch.tensor(cu), pool, slots, inputs.scale) is None, cu


def test_cpu_prefill_of_fast_forgetting_heads_matches_the_reference():
    """Log-decays around -90 make exp(g) denormal; the kernel flushes those to zero itself
    (denormal arithmetic would be ~40x slower), which changes nothing above 1e-38."""
    inputs = make_inputs(Shape((40, 7), 1, 2, 16, 16), torch.float32, with_state=False)
    inputs = replace(inputs, g=torch.full_like(inputs.g, -90.0))
    pool = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([2, 0])
    expected_pool = pool.clone()
    expected = gated_delta_prefill(inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.cu_seqlens, expected_pool,
                                   slots, inputs.scale, rule=naive_gated_delta_rule)
    with torch.inference_mode():
        out = gated_delta_prefill_cpu(inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.cu_seqlens, pool,
                                      slots, inputs.scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(pool, expected_pool, rtol=1e-5, atol=1e-30)


# --- transformers' Qwen3.5 torch implementation -----------------------------------------------

# One sequence each: transformers' torch path cannot keep packed sequences apart.
SINGLE_SEQUENCE_SHAPES = [
    Shape((1,), 2, 2, 16, 16),
    Shape((CHUNK_SIZE,), 1, 1, 32, 32),
    Shape((CHUNK_SIZE + 30,), 2, 4, 32, 16),
    Shape((3 * CHUNK_SIZE + 7,), 1, 2, 128, 64),
]
SINGLE_SEQUENCE_PARAMS = [pytest.param(shape, id=shape.id) for shape in SINGLE_SEQUENCE_SHAPES]


def batch_of_one(x: torch.Tensor) -> torch.Tensor:
    return x[None]


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("shape", SINGLE_SEQUENCE_PARAMS)
def test_chunk_matches_transformers(shape, with_state):
    """transformers normalises raw q/k inside (use_qk_l2norm_in_kernel=True); we get them normalised."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    raw = make_inputs(shape, torch.float32, with_state)
    raw_q, raw_k = raw.q * 3.0, raw.k * 0.5  # un-normalise
    inputs = replace(raw, q=l2_normalise(raw_q), k=l2_normalise(raw_k))

    expected_out, expected_state = torch_chunk_gated_delta_rule(
        batch_of_one(raw_q), batch_of_one(raw_k), batch_of_one(raw.v), g=batch_of_one(raw.g),
        beta=batch_of_one(raw.beta), chunk_size=CHUNK_SIZE, initial_state=raw.initial_state,
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    out, state = chunk_gated_delta_rule(*inputs.args(), chunk_size=CHUNK_SIZE)
    assert rel_rms(out, expected_out[0]) < FP32_TOL
    assert rel_rms(state, expected_state) < FP32_TOL


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize("shape", SINGLE_SEQUENCE_PARAMS)
def test_naive_matches_transformers_recurrent(shape, with_state):
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    inputs = make_inputs(shape, torch.float32, with_state)
    expected_out, expected_state = torch_recurrent_gated_delta_rule(
        batch_of_one(inputs.q), batch_of_one(inputs.k), batch_of_one(inputs.v), g=batch_of_one(inputs.g),
        beta=batch_of_one(inputs.beta), initial_state=inputs.initial_state, output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    out, state = naive_gated_delta_rule(*inputs.args())
    assert rel_rms(out, expected_out[0]) < FP32_TOL
    assert rel_rms(state, expected_state) < FP32_TOL


DECODE_SHAPE = Shape((1,) * 5, 2, 4, 32, 16)


@pytest.mark.parametrize("shape", [pytest.param(DECODE_SHAPE, id=DECODE_SHAPE.id)])
def test_recurrent_step_matches_transformers_decode(shape):
    """One decode step for N sequences == transformers' recurrent rule on a batch of N, T=1."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    inputs = make_inputs(shape, torch.float32, with_state=True)
    expected_out, expected_state = torch_recurrent_gated_delta_rule(
        inputs.q[:, None], inputs.k[:, None], inputs.v[:, None], g=inputs.g[:, None], beta=inputs.beta[:, None],
        initial_state=inputs.initial_state, output_final_state=True, use_qk_l2norm_in_kernel=False,
    )
    out, state = recurrent_gated_delta_rule(
        inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.initial_state, inputs.scale
    )
    assert rel_rms(out, expected_out[:, 0]) < FP32_TOL
    assert rel_rms(state, expected_state) < FP32_TOL
