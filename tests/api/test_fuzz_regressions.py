"""Requests that once answered 500, killed the engine, held the event loop or slipped values
nothing downstream can use past validation, each found by fuzzing the OpenAPI schema
(tests/api/test_fuzz.py) or by probing around what it found. Every one must now get an
OpenAI-style 4xx, or a 200 whose JSON is strict (no NaN/Infinity), with the engine alive."""

import json
import math
import time

import pytest
from fastapi.testclient import TestClient

from kiln_ray.api.generation import MIN_LOGPROB, ChoiceText
from kiln_ray.engine.request import TokenLogprob
from tests.api.server import make_app, wait_idle

CHAT = [{"role": "user", "content": "Say something."}]
CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def app(tiny_smol_dir, tmp_path_factory):
    app, engine = make_app(tiny_smol_dir, home=tmp_path_factory.mktemp("home"), max_model_len=256)
    with TestClient(app) as client:
        yield client, engine
    engine.service.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def http(app):
    return app[0]


@pytest.fixture(autouse=True)
def engine_survives(app):
    yield
    _, engine = app
    assert engine.is_alive(), engine.error
    wait_idle(engine)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JSON (and most clients) do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def assert_400(response, param_prefix: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param_prefix is not None:
        assert (error["param"] or "").startswith(param_prefix) or param_prefix in error["message"], error
    return error


def post_raw(http, path: str, body: str):
    """POST a JSON text as is: NaN literals and lone-surrogate escapes survive no encoder."""
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


# -- request validation -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["²", "--1", "9" * 5000], ids=["superscript-digit", "double-minus", "5000-digits"])
def test_logit_bias_keys_that_are_not_plain_token_ids_are_a_400(http, key):
    """str.isdigit() accepted "²" and "--1" lost its minus signs to lstrip; int() then raised
    (as it does past 4300 digits) outside any handler."""
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "logit_bias": {key: 1}})
    assert_400(r, "logit_bias")


@pytest.mark.parametrize("key", ["messages", "raise_exception", "range", "bos_token"])
def test_chat_template_kwargs_cannot_replace_what_the_renderer_supplies(http, key):
    """`messages` collided with render()'s own argument (TypeError); a global or special token
    replaced by a number breaks the template where it calls or concatenates it."""
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {key: 5}})
    assert key in assert_400(r)["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": "a\\udc00", "max_tokens": 2}'),
        ("/v1/completions/batch", '{"prompts": [[{"role": "user", "content": "\\ud83d"}]], "max_tokens": 2}'),
        ("/v1/train/sft", '{"examples": [{"messages": [{"role": "user", "content": "Hi"}, '
                          '{"role": "assistant", "content": "x\\ud800"}]}]}'),
    ],
    ids=["chat", "completions", "batch", "sft"],
)
def test_lone_surrogates_are_a_400_not_a_tokenizer_crash(http, path, body):
    """"\\ud800" is valid JSON but not Unicode text: the tokenizer raised a TypeError."""
    assert "surrogate" in assert_400(post_raw(http, path, body))["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/train/grpo", '{"groups": [{"messages": [{"role": "user", "content": "Hi"}], "completions": '
                           '[{"text": "a", "reward": NaN}, {"text": "b", "reward": 1}]}]}',
         "groups.0.completions.0.reward"),
        ("/v1/train/sft", '{"examples": [{"messages": %s}], "config": {"lora_alpha": Infinity}}' % json.dumps(CONV),
         "config.lora_alpha"),
        ("/v1/adapters/merge", '{"name": "m", "adapters": [{"name": "a", "weight": NaN}, {"name": "b"}]}',
         "adapters.0.weight"),
    ],
    ids=["grpo-reward-NaN", "sft-lora_alpha-Infinity", "merge-weight-NaN"],
)
def test_nan_and_infinity_literals_are_a_400(http, path, body, param):
    """Python's JSON parser takes NaN and Infinity; a NaN reward crashed the advantage maths."""
    assert_400(post_raw(http, path, body), param)


def test_json_nested_past_the_limit_is_a_400_not_a_recursion_error(http):
    """chat_template_kwargs reach transformers' recursive control-token marking."""
    nested = "[" * 500 + "]" * 500
    body = '{"messages": %s, "chat_template_kwargs": {"x": %s}}' % (json.dumps(CHAT), nested)
    r = post_raw(http, "/v1/chat/completions", body)
    assert "nested deeper" in assert_400(r)["message"]


# -- sampling at the edges ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"repetition_penalty": 1e-308}],
                         ids=["temperature-1e-300", "repetition_penalty-1e-308"])
def test_denormal_temperature_and_penalty_give_strict_json_logprobs(http, extreme, stream):
    """Logits divided by them overflowed to inf, logprobs became NaN: a 500 from the JSON
    encoder, and a bare NaN in the event stream."""
    body = {"messages": CHAT, "max_tokens": 4, "ignore_eos": True, "seed": 0, "logprobs": True, "top_logprobs": 2,
            "stream": stream, **extreme}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [strict_json(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        entries = [e for c in chunks for ch in c["choices"] for e in (ch["logprobs"] or {}).get("content", [])]
    else:
        entries = strict_json(r.text)["choices"][0]["logprobs"]["content"]
    assert len(entries) == 4 and all(math.isfinite(e["logprob"]) for e in entries)


def test_a_top_k_past_int64_does_not_kill_the_engine(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "top_k": 2**63})
    assert r.status_code == 200, r.text
    assert http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).status_code == 200


def test_non_finite_logprobs_are_reported_as_the_openai_floor(tokenizer):
    """Weights that are not finite (an uploaded adapter, say) give NaN logprobs; JSON has none."""
    choice = ChoiceText(tokenizer, 0, [], parse_tools=False, skip_special_tokens=True)
    entry = choice._logprob_entry(TokenLogprob(5, float("nan"), ((5, float("nan")), (7, float("-inf")))))
    assert entry.logprob == MIN_LOGPROB and [v for _, v in entry.top] == [MIN_LOGPROB, MIN_LOGPROB]


# -- training and adapters --------------------------------------------------------------------


def test_grpo_rewards_at_the_float_limit_are_accepted(http):
    """The mean of rewards of -1.8e308 overflowed (OverflowError from fsum: a 500)."""
    most = -1.7976931348623157e308
    group = {"messages": CHAT, "completions": [{"text": "a", "reward": most}, {"text": "b", "reward": most},
                                               {"text": "c", "reward": 0.0}]}
    r = http.post("/v1/train/grpo", json={"adapter": "huge-rewards", "groups": [group], "config": {"steps": 1}})
    assert r.status_code == 200, r.text


def test_a_diverging_training_job_fails_and_publishes_nothing(http):
    """lora_alpha 1e308 overflowed float32: the job 'completed' with NaN losses and published
    an adapter whose logprobs then made every request on it a 500."""
    r = http.post("/v1/train/sft", json={"adapter": "boom", "examples": [{"messages": CONV}],
                                         "config": {"steps": 3, "lora_alpha": 1e308, "early_stop_loss": None}})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    deadline = time.time() + 60
    while (status := http.get(f"/v1/train/status/{job_id}").json())["state"] in ("queued", "running"):
        assert time.time() < deadline, status
        time.sleep(0.05)
    assert status["state"] == "failed" and "diverged" in status["error"]
    assert status["adapter_version"] is None
    assert "boom" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.get("/v1/train/status").status_code == 200


def test_an_over_long_sft_example_is_refused_without_rendering_every_turn(http):
    """Every assistant turn rendered the chat up to it before the length was checked: 1000
    turns held the event loop (every other request) for 18 s, 256 such examples for an hour."""
    turns = [{"role": role, "content": "x"} for role in ("user", "assistant") * 500]
    started = time.perf_counter()
    r = http.post("/v1/train/sft", json={"examples": [{"messages": turns}]})
    assert "more than max_len=256" in assert_400(r)["message"]
    assert time.perf_counter() - started < 5


def test_merge_weights_that_overflow_are_a_400(http):
    """The SVD of an inf delta raised LinAlgError: a 500."""
    for name in ("m-a", "m-b"):
        r = http.post("/v1/train/sft", json={"adapter": name, "examples": [{"messages": CONV}],
                                             "config": {"steps": 1, "early_stop_loss": None}})
        assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while any(j["state"] in ("queued", "running") for j in http.get("/v1/train/status").json()["jobs"]):
        assert time.time() < deadline
        time.sleep(0.05)
    sources = [{"name": "m-a", "weight": 1e308}, {"name": "m-b", "weight": 1e308}]
    r = http.post("/v1/adapters/merge", json={"name": "m-inf", "method": "weighted_average", "adapters": sources})
    assert "not finite" in assert_400(r)["message"]
