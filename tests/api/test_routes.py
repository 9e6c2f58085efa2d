"""The HTTP API, in process (routes + a real engine on a tiny random model, no Ray), judged by
the official openai SDK and by raw HTTP for framing and errors."""

import json
import logging

import openai
import pytest

from kiln_ray.api.chat import render_chat
from tests.api.server import MODEL_NAME, make_app, wait_idle
from tests.helpers import observations_above

CHAT = [{"role": "user", "content": "Say something."}]


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_and_health(http, engine):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME
    for key in ("dtype", "device", "kv_blocks_used", "kv_blocks_total", "running", "waiting", "uptime_s"):
        assert key in health


def test_chat_completion_with_usage_and_length_finish(sdk, tokenizer):
    resp = sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert resp.usage.prompt_tokens == len(render_chat(tokenizer, CHAT))
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL_NAME


def test_streamed_chat_equals_the_non_streamed_answer(sdk, engine):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = sdk.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    wait_idle(engine)


def test_sse_framing_ends_with_done(http):
    body = {"messages": CHAT, "max_tokens": 4, "stream": True, "temperature": 0}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_choices_and_seed_reproducibility(sdk):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True})
    a = sdk.chat.completions.create(**kwargs)
    b = sdk.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 30


def test_stop_string_across_token_boundaries(sdk, tokenizer):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = sdk.chat.completions.create(**kwargs).choices[0].message.content
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    # A stop string made of the end of one token and the start of the next.
    first = tokenizer.decode(ids[:4])
    second = tokenizer.decode(ids[:5])
    stop = first[-2:] + second[len(first):len(first) + 2]
    cut = full.index(stop)
    resp = sdk.chat.completions.create(**kwargs, stop=[stop])
    assert resp.choices[0].message.content == full[:cut]
    assert resp.choices[0].finish_reason == "stop"
    streamed = sdk.chat.completions.create(**kwargs, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_multibyte_characters_are_never_split_in_deltas(sdk, tokenizer):
    """Push the sampler towards byte-level pieces of emoji and CJK, whose UTF-8 bytes span
    several tokens: every streamed delta must be whole characters."""
    pieces = set()
    for text in ("😀🎉🚀", "漢字かな", "ñé"):
        pieces.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    bias = {str(t): 8.0 for t in pieces}
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=40, temperature=0.8, seed=3, logit_bias=bias,
                  extra_body={"ignore_eos": True})
    whole = sdk.chat.completions.create(**kwargs).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(deltas) == whole
    assert any(ord(ch) > 0x7FF for ch in whole), "expected multi-byte characters in the output"
    if "\ufffd" not in whole:
        assert not any("\ufffd" in d for d in deltas)


def test_chat_logprobs(sdk):
    resp = sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(top[0], abs=1e-5)  # greedy picks the most likely


def test_completions_prompt_forms_echo_and_logprobs(sdk, tokenizer):
    text = sdk.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    by_ids = sdk.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert text.choices[0].text == by_ids.choices[0].text
    assert text.usage.prompt_tokens == len(ids)
    many = sdk.completions.create(model=MODEL_NAME, prompt=["a", "b", "c"], max_tokens=3, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == list(range(6))
    echo = sdk.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == "Once upon a time" + text.choices[0].text
    lp = echo.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == len("Once upon a time")
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text.choices[0].text


def test_batch_completions_run_together_with_derived_seeds(http, sdk, engine):
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    body = {"prompts": prompts, "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 100, "ignore_eos": True}
    wait_idle(engine)
    before = http.get("/metrics").text
    r = http.post("/v1/completions/batch", json=body)
    assert r.status_code == 200, r.text
    # More than 4 sequences in one step: all three prompts' pairs of completions ran together.
    after = http.get("/metrics").text
    assert observations_above(after, "kiln_batch_size", 4) - observations_above(before, "kiln_batch_size", 4) >= 1
    out = r.json()
    assert len(out["completions"]) == 6
    assert {(c["prompt_index"], c["completion_index"]) for c in out["completions"]} == {(p, i) for p in range(3) for i in range(2)}
    assert out["usage"]["completion_tokens"] == 36
    # completion (p, i) is sampled with seed + p * n + i: the same as a lone chat request.
    for c in out["completions"]:
        seed = 100 + c["prompt_index"] * 2 + c["completion_index"]
        single = sdk.chat.completions.create(model=MODEL_NAME, messages=prompts[c["prompt_index"]], max_tokens=6,
                                             temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        assert single.choices[0].message.content == c["text"]


def test_batch_completions_allow_at_most_64_completions(http):
    prompt = [{"role": "user", "content": "Hi"}]
    r = http.post("/v1/completions/batch", json={"prompts": [prompt] * 33, "n": 2, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "64" in r.json()["error"]["message"]
    r = http.post("/v1/completions/batch", json={"prompts": [prompt] * 32, "n": 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["completions"]) == 64


def test_a_client_request_id_is_echoed_and_logged_beside_the_completion_id(http, sdk, caplog):
    with caplog.at_level(logging.INFO, logger="kiln_ray.api"):
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                                            extra_headers={"x-request-id": "trace-42"})
        made = sdk.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)
        refused = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT},
                            headers={"x-request-id": "trace-43"})
    assert raw.headers["x-request-id"] == "trace-42"
    completion_id = raw.parse().id
    assert any("trace-42" in line and completion_id in line for line in caplog.messages)
    generated = made.headers["x-request-id"]  # none sent: one made for it, logged the same way
    assert generated and any(generated in line and made.parse().id in line for line in caplog.messages)
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "trace-43"
    assert any("trace-43" in line and "404" in line for line in caplog.messages)


def test_every_log_line_of_a_request_and_its_500_carry_its_request_id(http, caplog):
    """kiln_ray.logs appends the x-request-id to lines logged while a request is handled (tasks
    it starts included); a 500, answered outside the app's middleware, still has the header."""
    import asyncio

    from fastapi.testclient import TestClient

    from kiln_ray import logs

    app, log = http.app, logging.getLogger("kiln_ray.api")

    async def probe():
        log.info("probe in the handler")
        await asyncio.create_task(asyncio.sleep(0, log.info("probe in a task")))
        return {}

    async def fail():
        raise RuntimeError("boom")

    app.get("/v1/_probe")(probe)
    app.get("/v1/_fail")(fail)
    caplog.handler.addFilter(logs._RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="kiln_ray.api"):
        assert http.get("/v1/_probe", headers={"x-request-id": "trace-77"}).status_code == 200
        log.info("outside any request")
        failed = TestClient(app, raise_server_exceptions=False).get("/v1/_fail", headers={"x-request-id": "trace-78"})
    suffixes = {r.getMessage(): r.request_suffix for r in caplog.records}
    assert suffixes["probe in the handler"] == suffixes["probe in a task"] == " x-request-id=trace-77"
    assert suffixes["outside any request"] == ""
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "trace-78"
    assert failed.json()["error"]["code"] == "internal_error"


def test_unknown_openai_fields_are_ignored(http):
    body = {"messages": CHAT, "max_tokens": 2, "user": "u-1", "store": False, "metadata": {"a": "b"}, "some_new_field": 1}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": CHAT, "n": 0}, "n"),
        ({"messages": CHAT, "n": 1000}, "n"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CHAT, "temperature": -1}, "temperature"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "max_tokens": 100000}, "max_tokens"),
        ({"messages": CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": CHAT, "logit_bias": {"999999": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": CHAT, "stop": [""]}, "stop"),
    ],
)
def test_bad_requests_get_400_with_an_openai_error_body(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] is None or err["param"].startswith(param.split(".")[0])


def test_context_overflow_names_the_numbers(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 600})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "600" in message and "512" in message
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_and_unknown_model(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0).chat.completions.create(
            model="gpt-9", messages=CHAT)


def test_full_queue_gets_429_with_retry_after(tiny_smol_dir):
    import asyncio
    import threading

    from fastapi.testclient import TestClient

    from kiln_ray.engine.async_engine import GenerateRequest
    from kiln_ray.engine.sampling_params import SamplingParams

    app, engine = make_app(tiny_smol_dir, max_num_seqs=1, max_waiting_requests=0)
    started = threading.Event()

    async def occupy():  # holds the engine's only slot from another thread
        async for _ in engine.generate(GenerateRequest("occupier", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True))):
            started.set()

    worker = threading.Thread(target=lambda: asyncio.run(occupy()), daemon=True)
    worker.start()
    try:
        assert started.wait(10)
        with TestClient(app) as client:
            r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.shutdown()


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_what_happened(http, sdk, engine):
    route = 'route="/v1/chat/completions",status="200"'
    before = http.get("/metrics").text
    for _ in range(3):
        sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, extra_body={"ignore_eos": True})
    after = http.get("/metrics").text
    assert metric(after, "kiln_requests_total", route) - metric(before, "kiln_requests_total", route) == 3
    assert metric(after, "kiln_generation_tokens_total") - metric(before, "kiln_generation_tokens_total") == 15
    assert metric(after, "kiln_time_to_first_token_seconds_count") - metric(before, "kiln_time_to_first_token_seconds_count") == 3
    # 5 tokens per request: the first is the TTFT, four inter-token gaps follow.
    assert metric(after, "kiln_inter_token_latency_seconds_count") - metric(before, "kiln_inter_token_latency_seconds_count") == 12
    assert metric(after, "kiln_kv_blocks_total") == engine.stats().kv_blocks_total > 0


def test_a_client_that_leaves_a_stream_aborts_its_request(engine, sdk, caplog):
    max_tokens = 400
    steps = wait_idle(engine).steps
    with caplog.at_level(logging.INFO, logger="kiln_ray.api"), sdk.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        assert engine.stats().kv_blocks_used > 0
    # Closing the response mid-stream: the engine drops the request at its next step, long
    # before its 400 tokens (one step each) would have run out.
    stats = wait_idle(engine, timeout=5)
    assert not engine.engine.requests
    assert stats.steps - steps < max_tokens // 2
    assert any("finish=disconnected" in m for m in caplog.messages)  # the request still gets its log line


def test_every_request_frees_its_blocks_and_slots(engine, sdk):
    sdk.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, n=3)
    stats = wait_idle(engine)
    assert stats.state_slots_used == 0 and not engine.engine.requests
