"""Sampling and tool fields of a chat request, each judged by what it changes in the answer the
official SDK gets back from the real engine (a tiny random model: its next-token distribution
is nearly flat, and its greedy continuation repeats one token)."""

import math

import pytest

from kiln_ray.api.chat import ForcedCall, forced_call_prefix, render_chat
from tests.api.server import MODEL_NAME

CHAT = [{"role": "user", "content": "Say something."}]


def chat(sdk, **kwargs):
    return sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, **kwargs)


def first_tokens(resp) -> set[str]:
    return {c.logprobs.content[0].token for c in resp.choices}


def most_likely_first_tokens(sdk) -> tuple[list[str], list[float]]:
    """The most likely first tokens and their probabilities, most likely first, cut at the
    first clear gap after the second one: (tokens to keep, probabilities of all 20)."""
    top = chat(sdk, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20).choices[0].logprobs.content[0].top_logprobs
    k = next(k for k in range(2, len(top)) if top[k - 1].logprob - top[k].logprob > 0.01)
    return [t.token for t in top[:k]], [math.exp(t.logprob) for t in top]


def test_top_p_samples_only_from_the_nucleus(sdk):
    kept, probs = most_likely_first_tokens(sdk)
    k = len(kept)
    top_p = sum(probs[:k]) - probs[k - 1] / 2  # reached by the first k tokens, not by k - 1
    sampled = chat(sdk, max_tokens=1, temperature=1.0, top_p=top_p, n=16, seed=1, logprobs=True)
    assert first_tokens(sampled) <= set(kept)
    unrestricted = chat(sdk, max_tokens=1, temperature=1.0, n=16, seed=1, logprobs=True)
    assert not first_tokens(unrestricted) <= set(kept)


def test_min_p_samples_only_tokens_near_the_most_likely(sdk):
    kept, probs = most_likely_first_tokens(sdk)
    k = len(kept)
    min_p = (probs[k - 1] + probs[k]) / 2 / probs[0]  # the first k tokens pass, the next does not
    sampled = chat(sdk, max_tokens=1, temperature=1.0, n=16, seed=1, logprobs=True, extra_body={"min_p": min_p})
    assert first_tokens(sampled) <= set(kept)
    only_the_best = chat(sdk, max_tokens=8, temperature=1.0, seed=3, extra_body={"min_p": 1.0, "ignore_eos": True})
    greedy = chat(sdk, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert only_the_best.choices[0].message.content == greedy.choices[0].message.content


def test_top_k_samples_only_the_k_most_likely(sdk):
    kept, _ = most_likely_first_tokens(sdk)
    sampled = chat(sdk, max_tokens=1, temperature=1.0, n=16, seed=1, logprobs=True, extra_body={"top_k": len(kept)})
    assert first_tokens(sampled) <= set(kept)
    unrestricted = chat(sdk, max_tokens=1, temperature=1.0, n=16, seed=1, logprobs=True, extra_body={"top_k": -1})
    assert not first_tokens(unrestricted) <= set(kept)  # -1 (and 0) turn it off


def tokens(resp) -> list[str]:
    return [t.token for t in resp.choices[0].logprobs.content]


def test_presence_and_frequency_penalties_break_a_repeating_greedy_continuation(sdk):
    kwargs = dict(max_tokens=16, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    greedy = tokens(chat(sdk, **kwargs))
    assert max(greedy.count(t) for t in greedy) >= 8  # the continuation repeats
    for penalty in ("presence_penalty", "frequency_penalty"):
        strong = tokens(chat(sdk, **kwargs, **{penalty: 2.0}))
        assert len(set(strong)) == len(strong), penalty  # a seen token never wins again
    # A mild penalty: presence costs a seen token the same however often it was seen, while
    # frequency costs it more with each repetition, so it repeats less.
    presence = tokens(chat(sdk, **kwargs, presence_penalty=0.5))
    frequency = tokens(chat(sdk, **kwargs, frequency_penalty=0.5))
    assert max(frequency.count(t) for t in frequency) < max(presence.count(t) for t in presence)


def test_max_completion_tokens_caps_the_answer_and_wins_over_max_tokens(sdk):
    resp = chat(sdk, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"
    both = chat(sdk, max_tokens=10, max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 4


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


@pytest.mark.parametrize("tool_choice, offered", [
    ("auto", [WEATHER, TIME]),
    ("none", None),
    ({"type": "function", "function": {"name": "get_time"}}, [TIME]),
], ids=["auto", "none", "named"])
def test_tool_choice_decides_which_tools_the_prompt_offers(sdk, tokenizer, tool_choice, offered):
    resp = chat(sdk, max_tokens=1, tools=[WEATHER, TIME], tool_choice=tool_choice)
    forced = forced_call_prefix(ForcedCall("get_time") if isinstance(tool_choice, dict) else None)  # a named call is opened
    forced_ids = tokenizer.encode(forced, add_special_tokens=False) if forced else []
    assert resp.usage.prompt_tokens == len(render_chat(tokenizer, CHAT, offered)) + len(forced_ids)
    lengths = {len(render_chat(tokenizer, CHAT, tools)) for tools in ([WEATHER, TIME], None, [TIME])}
    assert len(lengths) == 3  # the three prompts differ, so the count tells them apart
