"""Training losses over a packed batch: chunked token log-probs, SFT cross-entropy, GRPO.

The output head is where training memory goes: T tokens x V vocabulary logits in float32 is
805 MB for T=4096, V=49152, and autograd would keep that (and the softmax) for the backward.
So logits are only ever built `chunk_size` rows at a time, in float32, inside an activation
checkpoint: the forward keeps the (chunk,) log-probs and drops the logits, the backward
recomputes one chunk's logits, takes its gradient and frees it before the next chunk.

    hidden (T, H) --split--> (c, H) --@ weight.T--> logits (c, V) --> log p(target) (c,)
                                     '----- recomputed in backward, never stored -----'

Peak extra memory is about three (chunk_size, V) float32 buffers (a chunk's log-softmax
output, its gradient, the logits' gradient), independent of T. Measured for V=49152, H=64:
~170 MB at chunk_size=256, ~620 MB at the default 1024 (a full (4096, V) logits tensor alone
is 805 MB), so large vocabularies want smaller chunks.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(targets[t] | hidden[t]) under the head `weight`, chunk by chunk.

    hidden: (T, H) float32 or bf16, final hidden states (after the last norm).
    weight: (V, H), the output head (tied embedding or lm_head).
    targets: (T,) int64 token ids; a position whose target does not matter may hold any valid id.
    Returns (T,) float32 (float64 for float64 inputs). Differentiable w.r.t. hidden and weight;
    never holds (T, V) logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logprob_chunks = [
        checkpoint(_chunk_logprobs, hidden_chunk, weight, target_chunk, use_reentrant=False)
        for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size))
    ]
    return torch.cat(logprob_chunks)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The matmul runs in the head's dtype (as the served model computes its logits: a bf16
    # head is never copied to float32, which for a 250k vocabulary would be GBs per chunk);
    # the softmax runs in float32 (float64 stays float64, for exact tests). log_softmax +
    # gather measured faster on CPU than logsumexp: its backward is one fused kernel.
    compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = (hidden.to(weight.dtype) @ weight.t()).to(compute_dtype)  # (c, V)
    return logits.log_softmax(dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)  # (c,)


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the masked positions, and how many there are.

    hidden (T, H), weight (V, H), targets (T,) int64, target_mask (T,) bool (a PackedBatch's).
    Returns (sum of -log p(target) over masked t as a float32 scalar, number of masked t).

    The sum is not divided here: with gradient accumulation the caller adds the sums of all
    micro-batches and divides by their total token count, so every target token weighs the
    same however the tokens fell into micro-batches (a mean per micro-batch would overweight
    tokens of short micro-batches). Only masked rows go through the head, so prompt tokens
    cost no logits.
    """
    selected = target_mask.nonzero().squeeze(1)  # (N,)
    logprobs = token_logprobs(hidden[selected], weight, targets[selected], chunk_size)  # (N,)
    return -logprobs.sum(), int(selected.numel())


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages_per_token: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float = 0.2,
    kl_coeff: float = 0.04,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss with a k3 KL penalty, token-mean over the whole batch.

    All inputs are (T,): logp the current policy's log-probs of the targets (differentiable),
    old_logp the sampling policy's and ref_logp the reference policy's (treated as constants),
    advantages_per_token the advantage of each token's completion, mask the completion targets.
    Per token:

        ratio     = exp(logp - old_logp)
        surrogate = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
        kl        = exp(ref_logp - logp) - (ref_logp - logp) - 1      (k3: unbiased, >= 0)
        loss      = mean over masked tokens of (surrogate + kl_coeff * kl)

    Returns (loss scalar, stats) with stats = {"ratio": mean ratio, "clip_fraction": share of
    tokens whose clipped term was taken (ratio > 1+eps with A > 0, or < 1-eps with A < 0),
    "kl": mean kl}, all over masked tokens. With no masked token the loss is 0.
    """
    # Only masked tokens enter the math, so unmasked positions may hold anything (even values
    # whose exp overflows) without leaking inf/nan into the gradient.
    selected = mask.bool().nonzero().squeeze(1)  # (N,)
    logp = logp[selected]
    old_logp, ref_logp = old_logp.detach()[selected], ref_logp.detach()[selected]
    advantages = advantages_per_token.detach()[selected].to(logp.dtype)
    num_tokens = max(int(selected.numel()), 1)

    # Policy term: PPO's pessimistic (clipped) surrogate.
    ratio = torch.exp(logp - old_logp)  # (N,)
    clipped_ratio = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)  # (N,)
    surrogate = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # (N,)

    # Penalty: k3 estimate of KL(policy || reference) from the sampled token alone.
    ref_log_ratio = ref_logp - logp  # (N,)
    kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0  # (N,)

    loss = (surrogate + kl_coeff * kl).sum() / num_tokens

    with torch.no_grad():
        clipped_high = (ratio > 1.0 + clip_epsilon) & (advantages > 0)
        clipped_low = (ratio < 1.0 - clip_epsilon) & (advantages < 0)
        clipped = clipped_high | clipped_low
        stats = {
            "ratio": ratio.sum().item() / num_tokens,
            "clip_fraction": clipped.sum().item() / num_tokens,
            "kl": kl.sum().item() / num_tokens,
        }
    return loss, stats
