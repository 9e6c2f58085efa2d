"""Sampler semantics on hand-built logits over an 8-token vocabulary: the exact logit changes of
logit_bias, min_tokens, and the presence, frequency and repetition penalties (read back through
the logprobs, which are log-softmax of the processed logits); which tokens top-k, top-p and
min-p keep and how often each is drawn; and that logprobs are taken after temperature and
before truncation."""

import math

import pytest
import torch

from kiln_ray.engine.request import Request
from kiln_ray.engine.sampler import Sampler
from kiln_ray.engine.sampling_params import SamplingParams

VOCAB = 8
LOGITS = torch.tensor([2.0, -1.0, 0.5, 1.5, -0.5, 0.0, 1.0, -2.0])
# A distribution with round probabilities for the truncation tests.
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
DRAWS = 20_000
FREQ_TOL = 0.02  # ~6 standard deviations of a frequency near 0.5 over DRAWS draws


def request(prompt=(5,), output=(), stop_token_ids=frozenset(), **params) -> Request:
    req = Request("r", list(prompt), SamplingParams(**{"max_tokens": 16, **params}), stop_token_ids=stop_token_ids)
    req.token_ids.extend(output)
    return req


def sample_one(req: Request, logits: torch.Tensor = LOGITS) -> tuple[int, torch.Tensor]:
    """(token, (VOCAB,) logprobs the sampler reports for every token) for one row."""
    [token], [logprob] = Sampler()(logits.clone()[None], [req])
    reported = torch.full((VOCAB,), float("nan"))
    for token_id, value in logprob.top:
        reported[token_id] = value
    assert logprob.token_id == token and logprob.logprob == reported[token].item()
    return token, reported


def processed(req: Request) -> torch.Tensor:
    """The logprobs a greedy request reports for LOGITS: log-softmax of its processed logits."""
    return sample_one(req)[1]


def assert_logits_became(req: Request, expected_logits: list[float]) -> None:
    expected = torch.log_softmax(torch.tensor(expected_logits), dim=-1)
    torch.testing.assert_close(processed(req), expected, rtol=0, atol=1e-6)


GREEDY = dict(temperature=0.0, logprobs=VOCAB)


def test_logit_bias_is_added_to_the_logits():
    req = request(logit_bias={3: 5.0, 7: -100.0, 0: -0.25}, **GREEDY)
    assert_logits_became(req, [1.75, -1.0, 0.5, 6.5, -0.5, 0.0, 1.0, -102.0])
    assert sample_one(req)[0] == 3


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """Token 2 was generated twice, 3 once; 0 and 2 sit in the prompt, which does not count.
    logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    req = request(prompt=(0, 2), output=(2, 2, 3), presence_penalty=1.0, frequency_penalty=0.5, **GREEDY)
    assert_logits_became(req, [2.0, -1.0, 0.5 - 2.0, 1.5 - 1.5, -0.5, 0.0, 1.0, -2.0])


def test_negative_presence_penalty_rewards_what_was_generated():
    req = request(output=(7,), presence_penalty=-4.5, **GREEDY)
    assert_logits_became(req, [2.0, -1.0, 0.5, 1.5, -0.5, 0.0, 1.0, 2.5])
    assert sample_one(req)[0] == 7


def test_repetition_penalty_shrinks_seen_logits_towards_minus_infinity():
    """Seen tokens (prompt and output): positive logits divided, negative ones multiplied."""
    req = request(prompt=(0, 1), output=(4, 0), repetition_penalty=2.0, **GREEDY)
    assert_logits_became(req, [1.0, -2.0, 0.5, 1.5, -1.0, 0.0, 1.0, -2.0])
    assert sample_one(req)[0] == 3


def test_min_tokens_masks_the_stop_tokens_until_enough_were_generated():
    stops = frozenset({0, 3})  # the two most likely tokens
    early = request(output=(6,), stop_token_ids=stops, min_tokens=2, **GREEDY)
    token, logprobs = sample_one(early)
    assert token == 6
    assert logprobs[0] == logprobs[3] == float("-inf")
    assert_logits_became(early, [-math.inf, -1.0, 0.5, -math.inf, -0.5, 0.0, 1.0, -2.0])
    enough = request(output=(6, 6), stop_token_ids=stops, min_tokens=2, **GREEDY)
    assert_logits_became(enough, LOGITS.tolist())
    assert sample_one(enough)[0] == 0


def test_logprobs_are_after_temperature_and_before_truncation():
    """temperature 2 with top_k 1: the argmax is drawn, yet every token gets its logprob
    under logits / 2, the truncated ones included."""
    req = request(temperature=2.0, top_k=1, logprobs=VOCAB)
    token, logprobs = sample_one(req)
    assert token == 0
    torch.testing.assert_close(logprobs, torch.log_softmax(LOGITS / 2, dim=-1), rtol=0, atol=1e-6)


def test_greedy_logprobs_are_at_temperature_one():
    torch.testing.assert_close(processed(request(**GREEDY)), torch.log_softmax(LOGITS, dim=-1), rtol=0, atol=1e-6)


# --- which tokens are drawn, and how often ----------------------------------------------------


def renormalised(weights: list[float]) -> dict[int, float]:
    total = sum(weights)
    return {i: w / total for i, w in enumerate(weights) if w > 0}


probs = PROBS.tolist()
CASES = {
    "top_k-3": ({"top_k": 3}, renormalised(probs[:3])),
    # mass before each token: 0, .40, .65, .80; the token crossing 0.6 (the second) is kept
    "top_p-0.6": ({"top_p": 0.6}, renormalised(probs[:2])),
    "top_p-0.7": ({"top_p": 0.7}, renormalised(probs[:3])),
    # top-p counts mass within the top-k: p / 0.9 gives .44, .28, .17, .11, so 0.7 is crossed earlier
    "top_k-4+top_p-0.7": ({"top_k": 4, "top_p": 0.7}, renormalised(probs[:2])),
    # kept: probability >= 0.3 x 0.4 = 0.12
    "min_p-0.3": ({"min_p": 0.3}, renormalised(probs[:3])),
    "temperature-0.5": ({"temperature": 0.5}, renormalised([x**2 for x in probs])),
    "untruncated": ({}, renormalised(probs)),
}


@pytest.mark.parametrize(("params", "expected"), list(CASES.values()), ids=list(CASES))
def test_truncation_keeps_exactly_these_tokens_drawn_in_proportion(params, expected):
    torch.manual_seed(0)
    req = request(**params)
    tokens, _ = Sampler()(PROBS.log().repeat(DRAWS, 1), [req] * DRAWS)
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    drawn = {i for i in range(VOCAB) if counts[i]}
    if params:  # untruncated: the rarest token (0.005) may be missed by chance
        assert drawn == set(expected), "a truncated token was drawn, or a kept one never"
    for token, prob in expected.items():
        assert counts[token].item() / DRAWS == pytest.approx(prob, abs=FREQ_TOL), f"token {token}"
