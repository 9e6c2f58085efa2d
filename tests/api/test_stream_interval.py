"""`stream_interval`: a stream's tokens go out every k engine steps, the first at once and a
finish at once, with exactly the text, logprobs and finish of the one-step-per-event stream.
The real engine over the tiny random model: one request gets one token per step."""

import json

import pytest
from fastapi.testclient import TestClient

from tests.api.server import make_app

NEW_TOKENS = 21


@pytest.fixture(scope="module")
def every_fourth_step(tiny_smol_dir):
    app, engine = make_app(tiny_smol_dir, max_model_len=512, server={"stream_interval": 4})
    with TestClient(app) as client:
        yield client
    engine.shutdown()


def stream_events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("n", [1, 2])
def test_every_fourth_step_sends_the_same_stream_in_fewer_events(http, every_fourth_step, n):
    body = {"model": "tiny-smol", "prompt": "Count with me:", "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 1, "n": n, "seed": 3}
    streams = {}
    for name, client in (("each step", http), ("every 4th", every_fourth_step)):
        events = stream_events(client, body)
        by_choice = {i: [c for e in events for c in e["choices"] if c["index"] == i] for i in range(n)}
        streams[name] = (len(events), {
            i: ("".join(c["text"] for c in cs), [t for c in cs if c["logprobs"] for t in c["logprobs"]["tokens"]],
                [c["finish_reason"] for c in cs if c["finish_reason"]])
            for i, cs in by_choice.items()})
    (events_1, choices_1), (events_4, choices_4) = streams["each step"], streams["every 4th"]
    assert choices_4 == choices_1  # the same text, token by token, and one finish per choice
    assert all(len(tokens) == NEW_TOKENS and finish == ["length"] for _, tokens, finish in choices_1.values())
    assert events_1 >= NEW_TOKENS  # one event per step (several choices of a step share one)
    assert events_4 <= 1 + -(-(NEW_TOKENS - 1) // 4) + 1  # the first at once, then every 4 steps, the finish
