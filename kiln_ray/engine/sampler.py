"""Sampler: logits of the rows to sample -> one token each (and logprobs when asked).

Order of operations, all batched over rows:

    1. logit_bias, min_tokens (stop tokens masked), a guide's mask (tokens outside its grammar),
       penalties (repetition, presence, frequency)
    2. temperature (greedy rows: 1, for their logprobs)
    3. logprobs = log_softmax of that            <- what the API reports
    4. top-k, top-p, min-p truncation (non-greedy rows that ask for it)
    5. greedy rows: argmax; others: exponential race, argmax(p / E) with E ~ Exp(1), which
       draws from p. A seeded row draws E from its own generator, so its tokens do not
       depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln_ray.engine.guide import apply_guides
from kiln_ray.engine.request import Request, TokenLogprob


class Sampler:
    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`argmax`: (R, V) -> (R,) int64, first index of each row's maximum (kernels/argmax.py)."""
        self.argmax = argmax or (lambda scores: scores.argmax(dim=-1))

    @staticmethod
    def is_plain_greedy(rows: list[Request]) -> bool:
        """Every row takes the argmax of its raw logits: no bias, penalties, masked stop
        tokens or logprobs. Such rows need no float32 copy of the logits at all (the argmax of
        bf16 logits is the argmax of their exact float32 conversion)."""
        for r in rows:
            p = r.params
            if not p.greedy or p.logit_bias or p.needs_penalties or p.logprobs is not None:
                return False
            if p.min_tokens and r.num_output_tokens < p.min_tokens and r.stop_token_ids:
                return False
            if r.guide is not None and r.guide.constrained:
                return False
        return True

    def __call__(self, logits: torch.Tensor, rows: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (R, V), one row per entry of `rows` (a request may appear as several rows
        only through siblings, each with its own generator): float32, or any float dtype when
        `is_plain_greedy(rows)`. Mutates `logits`."""
        if logits.dtype != torch.float32 and self.is_plain_greedy(rows):
            return self.argmax(logits).tolist(), [None] * len(rows)
        logits = logits.float()
        params = [r.params for r in rows]
        device = logits.device
        self._apply_bias_and_min_tokens(logits, rows)
        if any(r.guide is not None for r in rows):
            apply_guides(logits, [r.guide for r in rows])
        if any(p.needs_penalties for p in params):
            self._apply_penalties(logits, rows)

        greedy = torch.tensor([p.greedy for p in params], device=device)
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
        if not bool((temps == 1.0).all()):
            logits.div_(temps[:, None])

        want_logprobs = [p.logprobs is not None for p in params]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if bool(greedy.all()):
            tokens = self.argmax(logits)
        else:
            if any(p.needs_truncation and not p.greedy for p in params):
                self._truncate(logits, params)
            probs = torch.softmax(logits, dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for i, r in enumerate(rows):
                if r.generator is not None and not params[i].greedy:
                    noise[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(device)
            sampled = self.argmax(probs.div_(noise))
            tokens = torch.where(greedy, self.argmax(logits), sampled)

        token_list = tokens.tolist()
        return token_list, self._logprobs(logprobs, token_list, params) if logprobs is not None else [None] * len(rows)

    @staticmethod
    def _apply_bias_and_min_tokens(logits: torch.Tensor, rows: list[Request]) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
                logits[i].index_add_(0, ids, vals)
            if p.min_tokens and r.num_output_tokens < p.min_tokens and r.stop_token_ids:
                logits[i, list(r.stop_token_ids)] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[Request]) -> None:
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            p = r.params
            if not p.needs_penalties:
                continue
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.int64, device=logits.device)
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                # A tiny penalty (1e-300) would divide logits into +inf, and softmax into NaN.
                boosted = (vals / p.repetition_penalty).clamp(max=torch.finfo(logits.dtype).max)
                logits[i, seen] = torch.where(vals > 0, boosted, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.num_output_tokens:
                out = torch.tensor(r.output_token_ids, dtype=torch.int64, device=logits.device)
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    @staticmethod
    def _truncate(logits: torch.Tensor, params: list) -> None:
        """Mask (to -inf) what top-k, top-p and min-p exclude, per row."""
        vocab = logits.shape[1]
        # Clamped before it becomes a tensor: a top_k past int64 (2**63) cannot be one.
        top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
        min_p = torch.tensor([p.min_p for p in params], device=logits.device, dtype=logits.dtype)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
        # min-p: drop tokens below min_p x the most likely token's probability
        drop |= sorted_probs < (min_p[:, None] * sorted_probs[:, :1])
        drop[:, 0] = False
        logits.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))

    @staticmethod
    def _logprobs(logprobs: torch.Tensor, tokens: list[int], params: list) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = []
        max_top = max((p.logprobs or 0) for p in params)
        top_vals, top_ids = (logprobs.topk(max_top, dim=-1) if max_top else (None, None))
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None]).squeeze(1).tolist()
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            top = ()
            if p.logprobs:
                top = tuple(zip(top_ids[i, : p.logprobs].tolist(), top_vals[i, : p.logprobs].tolist()))
            out.append(TokenLogprob(tokens[i], chosen[i], top))
        return out
