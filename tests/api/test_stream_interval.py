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


class _FailsAfterSix:
    """Six increments of one token, then the engine dies."""

    def __init__(self, tokenizer):
        self.ids = tokenizer(" one two three four five six", add_special_tokens=False)["input_ids"][:6]
        self.died = False

    async def generate(self, request, choice):
        from kiln_ray.engine.async_engine import EngineDeadError
        from kiln_ray.engine.request import RequestOutput

        for i, token in enumerate(self.ids):
            yield [RequestOutput(request.request_id, 0, [token], None, num_prompt_tokens=len(request.prompt_token_ids),
                                 num_output_tokens=i + 1)]
        self.died = True
        raise EngineDeadError("the engine loop stopped")

    async def call(self, method, *args):
        return {"adapters": [], "default_adapter": None}

    async def info(self):
        return {"alive": True}


def _stream_through_fails_after_six(tokenizer_dir, engine=None) -> tuple[list[dict], "_FailsAfterSix", object]:
    from kiln_ray.api.routes import ServerContext, create_app
    from kiln_ray.config import KilnConfig
    from kiln_ray.model.registry import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    engine = engine or _FailsAfterSix(tokenizer)
    ctx = ServerContext(config=KilnConfig(model=str(tokenizer_dir), stream_interval=4), engine=engine,
                        tokenizer=tokenizer, model_name="m", max_model_len=512, vocab_size=tokenizer.vocab_size)
    with TestClient(create_app(ctx)) as client:
        with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 50,
                                                              "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")], engine, tokenizer


def test_tokens_held_back_for_the_next_event_go_out_before_an_error(tiny_smol_dir):
    """With stream_interval 4 the sixth token waits for the eighth step; the engine dies at the
    seventh: the sixth is sent, then the error event."""
    events, engine, tokenizer = _stream_through_fails_after_six(tiny_smol_dir)
    text = "".join(c["text"] for e in events if "choices" in e for c in e["choices"])
    assert text == tokenizer.decode(engine.ids)
    assert len([e for e in events if "choices" in e]) == 3  # the first, steps 2-5, and the held-back sixth
    assert "error" in events[-1]


def test_a_failure_while_sending_the_held_back_tokens_still_ends_with_an_error_event(tiny_smol_dir, monkeypatch):
    """The last flush runs outside the stream's main try: if turning the held-back increments
    into an event fails too, the client still gets the error event and [DONE], not a cut stream."""
    import kiln_ray.api.streaming as streaming
    from kiln_ray.model.registry import load_tokenizer

    engine = _FailsAfterSix(load_tokenizer(tiny_smol_dir))
    real_merge = streaming.merge_deltas

    def merge_then_fail(deltas):
        if engine.died:  # only the flush of the held-back sixth token merges after the engine died
            raise RuntimeError("detokenizer bug")
        return real_merge(deltas)

    monkeypatch.setattr(streaming, "merge_deltas", merge_then_fail)
    events, _, _ = _stream_through_fails_after_six(tiny_smol_dir, engine)
    assert len([e for e in events if "choices" in e]) == 2  # the first, then steps 2-5; the sixth is lost
    assert "engine" in events[-1]["error"]["message"]  # the engine's error, reported once
    assert sum("error" in e for e in events) == 1
