"""Greedy-equality helpers that tell a real divergence from an fp32 near-tie."""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch

TIE_GAP = 1e-5  # top-2 logit gap under which fp32 rounding may legitimately swap the argmax


def run_to_completion(engine, max_steps: int = 100_000) -> dict[str, dict[int, list[int]]]:
    """Step until idle; request_id -> sequence index -> generated token ids."""
    outs: dict[str, dict[int, list[int]]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def hf_greedy_batch(hf_model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int) -> list[list[int]]:
    """`hf_greedy` of every prompt in one left-padded `generate` call (much cheaper than one
    call per prompt on CPU; padded rows give the same tokens up to fp32 near-ties)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return out[:, width:].tolist()


def assert_same_greedy(
    ours: list[int], ref: list[int], hf_model, prompt: list[int], label: str, masked_ids: Collection[int] = ()
) -> None:
    """Equal token for token, except that a divergence at an fp32 near-tie (top-2 gap of the
    reference logits < TIE_GAP) ends the comparison there, reported as a warning. `masked_ids`:
    tokens both generations masked (EOS under min_tokens), so never one of the two tied."""
    if ours == ref:
        return
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ref[:k]])).logits[0, -1]
    logits[list(masked_ids)] = float("-inf")
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    if gap < TIE_GAP and ours[k] in logits.topk(2).indices.tolist():
        warnings.warn(f"{label}: near-tie at token {k} (top-2 gap {gap:.2e}); compared the first {k} tokens")
        return
    raise AssertionError(f"{label}: diverged at token {k} (top-2 gap {gap:.3g})\n ours {ours}\n  ref {ref}")
