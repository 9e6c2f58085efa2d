"""kiln_ray.training.losses: chunked log-probs and SFT loss against full-logits cross-entropy,
the chunked head's peak memory, and GRPO's clipped surrogate and k3 KL computed by hand."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kiln_ray.training.losses import grpo_loss, sft_loss, token_logprobs
from tests.helpers import rel_rms

T, V, H = 37, 50, 16
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6}  # relative RMS error


def make_head(dtype: torch.dtype, seed: int = 0):
    """Random hidden (T, H), weight (V, H) leaves, targets (T,), and a mask over 2/3 of T."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=generator)
    target_mask = torch.arange(T) % 3 != 0
    return hidden, weight, targets, target_mask


def grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


CASES = [
    pytest.param(dtype, chunk_size, id=f"{str(dtype).removeprefix('torch.')}-T{T}-V{V}-chunk{chunk_size}")
    for dtype in (torch.float64, torch.float32)
    for chunk_size in (1, 7, 64)
]


# --- token_logprobs / sft_loss against full logits ---------------------------------------------


@pytest.mark.parametrize("dtype, chunk_size", CASES)
def test_token_logprobs_match_full_cross_entropy_values_and_grads(dtype, chunk_size):
    hidden, weight, targets, _ = make_head(dtype)
    upstream = torch.randn(T, dtype=dtype, generator=torch.Generator().manual_seed(1))

    logprobs = token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    expected = -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")  # (T, V) logits

    assert logprobs.shape == (T,) and logprobs.dtype == dtype
    assert rel_rms(logprobs, expected) < TOLERANCE[dtype]
    actual_grads = grads((logprobs * upstream).sum(), hidden, weight)
    expected_grads = grads((expected * upstream).sum(), hidden, weight)
    for actual, reference in zip(actual_grads, expected_grads):
        assert rel_rms(actual, reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, chunk_size", CASES)
def test_sft_loss_is_the_summed_masked_cross_entropy_and_its_count(dtype, chunk_size):
    hidden, weight, targets, target_mask = make_head(dtype)

    loss, count = sft_loss(hidden, weight, targets, target_mask, chunk_size=chunk_size)
    logits = hidden @ weight.t()  # (T, V)
    expected = F.cross_entropy(logits[target_mask], targets[target_mask], reduction="sum")

    assert count == int(target_mask.sum()) == 24
    assert loss.shape == () and rel_rms(loss, expected) < TOLERANCE[dtype]
    for actual, reference in zip(grads(loss, hidden, weight), grads(expected, hidden, weight)):
        assert rel_rms(actual, reference) < TOLERANCE[dtype]


def test_sft_loss_summed_over_micro_batches_equals_one_batch():
    """Dividing the summed losses by the total count weighs every token the same."""
    hidden, weight, targets, target_mask = make_head(torch.float64)
    split = 10  # micro-batches of 10 and 27 rows, with 6 and 18 masked targets

    whole, whole_count = sft_loss(hidden, weight, targets, target_mask)
    first, first_count = sft_loss(hidden[:split], weight, targets[:split], target_mask[:split])
    second, second_count = sft_loss(hidden[split:], weight, targets[split:], target_mask[split:])

    assert first_count + second_count == whole_count
    assert (first + second).item() == pytest.approx(whole.item(), rel=1e-12)


def test_bf16_hidden_and_head_give_float32_logprobs_and_bf16_grads():
    hidden, weight, targets, _ = make_head(torch.float32)
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    weight_bf16 = weight.detach().bfloat16().requires_grad_()

    logprobs = token_logprobs(hidden_bf16, weight_bf16, targets, chunk_size=7)
    # Logits as the served bf16 model computes them (a bf16 matmul), softmax in float32.
    expected = -F.cross_entropy((hidden_bf16 @ weight_bf16.t()).float(), targets, reduction="none")
    exact = -F.cross_entropy(hidden_bf16.float() @ weight_bf16.float().t(), targets, reduction="none")

    assert logprobs.dtype == torch.float32
    assert rel_rms(logprobs, expected) < 1e-6
    assert rel_rms(logprobs, exact) < 1e-2  # bf16 logits stay close to float32 ones
    logprobs.sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and weight_bf16.grad.dtype == torch.bfloat16


def test_sft_loss_with_no_target_is_zero_and_still_backpropagates():
    hidden, weight, targets, _ = make_head(torch.float32)

    loss, count = sft_loss(hidden, weight, targets, torch.zeros(T, dtype=torch.bool))

    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().sum().item() == 0.0


# --- memory ------------------------------------------------------------------------------------

# Measured in a fresh interpreter as growth of the OS's peak resident set size (VmHWM), reset
# to the current RSS just before each measured step (`5 > /proc/self/clear_refs`), so earlier
# peaks (imports, input setup, earlier tests) cannot hide or inflate it. tracemalloc cannot see
# torch's CPU tensors (they come from glibc malloc); MALLOC_MMAP_THRESHOLD_=1 MiB makes glibc
# mmap every allocation of 1 MiB or more and unmap it on free (a fixed threshold, not the
# adaptive one that would park freed tensors in the heap), so RSS follows live tensor memory to
# within a few MiB. The script prints the peak growth of a chunked forward+backward, then of one
# full logits tensor: a control that proves the measure sees an allocation of that size.
MEMORY_SCRIPT = textwrap.dedent(
    """
    import re, torch
    from kiln_ray.training.losses import sft_loss

    torch.set_num_threads(2)
    T, V, H, CHUNK = 4096, 49152, 64, 256

    def status_bytes(field):
        with open("/proc/self/status") as status:
            return int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1)) * 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        return status_bytes("VmRSS")

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=generator).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) * 0.05).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=generator)
    mask = torch.ones(T, dtype=torch.bool)
    loss, _ = sft_loss(hidden[:8], weight, targets[:8], mask[:8], CHUNK)  # warm up thread pools,
    loss.backward()                                                      # and allocate weight.grad

    baseline = reset_peak()
    loss, count = sft_loss(hidden, weight, targets, mask, CHUNK)
    loss.backward()
    chunked = status_bytes("VmHWM") - baseline
    assert count == T and torch.isfinite(hidden.grad).all()

    baseline = reset_peak()
    full_logits = torch.ones(T, V)  # what an unchunked head would hold, before its softmax
    control = status_bytes("VmHWM") - baseline
    print(chunked, control)
    """
)


def test_chunked_head_forward_backward_peaks_far_below_full_logits():
    full_logits_bytes = 4096 * 49152 * 4  # 805 MB of float32

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], env=environment, capture_output=True, text=True, timeout=120,
        check=True,
    )
    chunked, control = map(int, result.stdout.split())

    # A chunk's backward holds three (256, V) float32 buffers at once (log-softmax output, its
    # gradient, the logits' gradient): ~50 MB each, ~160 MB measured.
    assert chunked < 0.3 * full_logits_bytes, f"chunked peak {chunked / 2**20:.0f} MiB"
    assert control > 0.95 * full_logits_bytes, f"control peak {control / 2**20:.0f} MiB"


# --- grpo_loss ---------------------------------------------------------------------------------


def test_grpo_loss_by_hand_on_two_groups_of_three_tokens():
    """Two completions, one from each group, three target tokens each, behind one prompt token.

    eps = 0.2, kl_coeff = 0.04. Completion 1 has A = +0.5, completion 2 has A = -1.0.

        token  ratio  A     ratio*A  clip(ratio)*A  surrogate = -min(...)  clipped?
        1.1    1.5   +0.5   0.75     1.2*0.5 = 0.6      -0.6               yes (above 1+eps, A>0)
        1.2    1.0   +0.5   0.5      0.5                -0.5               no
        1.3    0.5   +0.5   0.25     0.8*0.5 = 0.4      -0.25              no  (below, but A>0)
        2.1    0.5   -1.0  -0.5      0.8*-1 = -0.8       0.8               yes (below 1-eps, A<0)
        2.2    1.5   -1.0  -1.5      1.2*-1 = -1.2       1.5               no  (above, but A<0)
        2.3    1.0   -1.0  -1.0     -1.0                 1.0               no

    KL (k3, d = ref_logp - logp): exp(d) - d - 1
        1.1  d = ln 2    2 - ln 2 - 1   = 0.30685282
        2.1  d = ln 1/2  1/2 + ln 2 - 1 = 0.19314718
        others d = 0     0
        sum = 1.5 - 1 = 0.5 exactly (the ln 2 terms cancel), mean = 0.5 / 6

    loss = (sum surrogate + 0.04 * sum kl) / 6 = (1.95 + 0.02) / 6 = 0.32833333
    mean ratio = (1.5 + 1 + 0.5 + 0.5 + 1.5 + 1) / 6 = 1.0; clip fraction = 2 / 6
    """
    ln2 = math.log(2.0)
    logp = torch.tensor([-9.0, -1.0, -2.0, -3.0, -1.5, -2.5, -0.5, -7.0, -4.0, -6.0], dtype=torch.float64)
    #                    prompt|   completion 1       |  completion 2      | prompt of the next
    log_ratio = torch.tensor([50.0, math.log(1.5), 0.0, math.log(0.5), math.log(0.5), math.log(1.5), 0.0,
                              -60.0, 0.0, 0.0], dtype=torch.float64)
    ref_minus_logp = torch.tensor([90.0, ln2, 0.0, 0.0, -ln2, 0.0, 0.0, 100.0, 0.0, 0.0], dtype=torch.float64)
    advantages = torch.tensor([7.0, 0.5, 0.5, 0.5, -1.0, -1.0, -1.0, 7.0, 7.0, 7.0], dtype=torch.float64)
    mask = torch.tensor([False, True, True, True, True, True, True, False, False, False])
    logp.requires_grad_()
    # unmasked positions hold wild values (exp(100) overflows float32): they must not matter

    loss, stats = grpo_loss(
        logp, logp.detach() - log_ratio, logp.detach() + ref_minus_logp, advantages, mask,
        clip_epsilon=0.2, kl_coeff=0.04,
    )

    assert loss.item() == pytest.approx(1.97 / 6, rel=1e-12)
    assert stats["ratio"] == pytest.approx(1.0, rel=1e-12)
    assert stats["clip_fraction"] == pytest.approx(2 / 6, rel=1e-12)
    assert stats["kl"] == pytest.approx(0.5 / 6, rel=1e-12)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[~mask].abs().sum().item() == 0.0


def test_grpo_loss_clipped_tokens_get_no_policy_gradient():
    # d/dlogp of -ratio*A is -ratio*A; of the clipped constant it is 0. Token-mean over 4 tokens.
    logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    old_logp = -torch.log(torch.tensor([1.5, 1.1, 0.5, 0.9], dtype=torch.float64))  # ratio = these
    advantages = torch.tensor([1.0, 1.0, -2.0, -2.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)

    loss, _ = grpo_loss(logp, old_logp, logp.detach(), advantages, mask, kl_coeff=0.0)
    loss.backward()

    expected = torch.tensor([0.0, -1.1 * 1.0, 0.0, -0.9 * -2.0], dtype=torch.float64) / 4
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_grpo_loss_on_policy_is_minus_the_mean_advantage_with_zero_kl():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25], requires_grad=True)
    advantages = torch.tensor([1.5, 1.5, -0.5, -0.5, 2.0])
    mask = torch.tensor([True, True, True, True, False])

    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), advantages, mask)

    # ratio = 1 everywhere, so the surrogate is -A; mean over the 4 masked: -(1.5+1.5-0.5-0.5)/4
    assert loss.item() == pytest.approx(-0.5, rel=1e-6)
    assert stats == {"ratio": 1.0, "clip_fraction": 0.0, "kl": 0.0}
    loss.backward()
    # The KL gradient vanishes too at logp == ref_logp; only -A/N remains.
    torch.testing.assert_close(logp.grad, torch.tensor([-1.5, -1.5, 0.5, 0.5, 0.0]) / 4)


def test_grpo_loss_of_a_degenerate_group_is_only_the_kl_term():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.tensor([-1.0 + math.log(2.0), -2.0], dtype=torch.float64)
    mask = torch.ones(2, dtype=torch.bool)

    loss, stats = grpo_loss(logp, logp.detach() - 0.3, ref_logp, torch.zeros(2), mask)

    # A = 0 kills the surrogate whatever the ratio; kl = (2 - ln 2 - 1) / 2 per token-mean
    assert loss.item() == pytest.approx(0.04 * (1.0 - math.log(2.0)) / 2, rel=1e-12)
    assert stats["clip_fraction"] == 0.0


def test_grpo_loss_with_no_masked_token_is_zero():
    logp = torch.randn(3, requires_grad=True)
    mask = torch.zeros(3, dtype=torch.bool)

    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), torch.ones(3), mask)

    assert loss.item() == 0.0
    assert stats == {"ratio": 0.0, "clip_fraction": 0.0, "kl": 0.0}
