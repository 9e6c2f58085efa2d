"""Structured output through the API on a random-weight model (SmolLM2's vocabulary): left
alone it writes no JSON at all, so every valid document below is the guide's doing. Schemas
avoid free strings, which a random model has no reason to close; tests/engine/test_real_model.py
has the real model writing them."""

import json

import jsonschema
import openai
import pytest

FORECAST = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hourly": {"type": "boolean"},
        "sky": {"type": "array", "items": {"enum": ["sun", "rain", "snow"]}, "maxItems": 3},
        "note": {"type": "null"},
    },
    "required": ["unit", "days", "sky"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Give me the forecast."}]


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}


def tool(name: str, parameters: dict, strict: bool | None = None) -> dict:
    fn = {"name": name, "description": f"{name} of a place", "parameters": parameters}
    if strict is not None:
        fn["strict"] = strict
    return {"type": "function", "function": fn}


def test_json_schema_replies_are_valid_documents(sdk):
    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, n=4, seed=3, temperature=1.0,
                                        max_tokens=200, response_format=schema_format(FORECAST))
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), FORECAST)


def test_without_a_format_the_same_model_writes_no_json(sdk):
    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, n=4, seed=3, temperature=1.0, max_tokens=40)
    for choice in reply.choices:
        with pytest.raises(ValueError):
            json.loads(choice.message.content)


def test_a_streamed_json_object_reply_is_a_valid_object(sdk):
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    stream = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, seed=5, max_tokens=300, stream=True,
                                         logit_bias={"18": 8}, response_format=schema_format(schema))  # 18: '"' closes keys
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_completions_take_a_response_format_too(http):
    r = http.post("/v1/completions", json={"model": "tiny-smol", "prompt": "Forecast:", "max_tokens": 200, "seed": 1,
                                           "response_format": schema_format(FORECAST)})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), FORECAST)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_call_has_arguments_that_fit_its_parameters(sdk, stream):
    tools = [tool("get_forecast", FORECAST), tool("get_time", {"type": "object", "properties": {"utc": {"type": "boolean"}}})]
    kwargs = dict(model="tiny-smol", messages=QUESTION, tools=tools, seed=7, max_tokens=150,
                  tool_choice={"type": "function", "function": {"name": "get_forecast"}})
    if stream:
        chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
        calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = sdk.chat.completions.create(**kwargs).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_forecast"
    jsonschema.validate(json.loads(calls[0].function.arguments), FORECAST)


def test_required_lets_the_model_pick_an_offered_function_with_valid_arguments(sdk):
    small = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}
    tools = [tool("get_forecast", FORECAST), tool("get_time", small)]
    for seed in range(3):
        choice = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, tools=tools, tool_choice="required",
                                             parallel_tool_calls=False, seed=seed, max_tokens=150).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        schema = {"get_forecast": FORECAST, "get_time": small}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("body, param", [
    ({"response_format": schema_format({"type": "object", "allOf": []})}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, None),
    ({"response_format": {"type": "yaml"}}, None),
    ({"response_format": {"type": "json_object"}, "tools": [tool("f", {"type": "object"})]}, None),
    ({"tools": [tool("f", {"type": "object", "patternProperties": {}}, strict=True)], "tool_choice": "required"}, "tools"),
    # Each function's parameters can be enforced, not all five together (MAX_NODES).
    ({"tools": [tool(f"f{i}", {"type": "object", "properties": {f"p{j}": {"type": "integer"} for j in range(1000)}})
                for i in range(5)]}, "tools"),
])
def test_formats_it_cannot_honour_are_a_400(http, body, param):
    r = http.post("/v1/chat/completions", json={"model": "tiny-smol", "messages": QUESTION, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_a_non_strict_tool_with_an_unenforceable_schema_still_gets_an_object(sdk):
    tools = [tool("f", {"type": "object", "properties": {"a": {"type": "integer"}}, "patternProperties": {}})]
    choice = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, tools=tools, seed=2, max_tokens=150,
                                         tool_choice="required", parallel_tool_calls=False,
                                         logit_bias={"18": 8}).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)


def test_the_openai_sdk_sends_a_bad_format_and_gets_a_clean_error(sdk):
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, max_tokens=4,
                                    response_format=schema_format({"$ref": "https://example.com/x"}))


def test_the_sdk_parse_helper_gets_its_pydantic_model_back(sdk):
    """openai's `chat.completions.parse(response_format=Model)` sends the model's strict JSON
    schema (titles, enums with a type, nested models through $defs / $ref) and parses the reply
    into the model."""
    from typing import Literal

    from pydantic import BaseModel

    class Day(BaseModel):
        sky: Literal["sun", "rain", "snow"]
        windy: bool

    class Forecast(BaseModel):
        unit: Literal["celsius", "fahrenheit"]
        days: list[Day]

    reply = sdk.chat.completions.parse(model="tiny-smol", messages=QUESTION, seed=4, max_tokens=250,
                                       response_format=Forecast)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and all(isinstance(d, Day) for d in parsed.days)


def test_vllm_guided_choice_answers_with_exactly_one_label(sdk):
    labels = ["positive", "negative", "neutral"]
    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, n=6, seed=1, max_tokens=20,
                                        extra_body={"guided_choice": labels})
    assert {c.message.content for c in reply.choices} <= set(labels)
    assert all(c.finish_reason == "stop" for c in reply.choices)


@pytest.mark.parametrize("extra", [{"guided_json": FORECAST}, {"structured_outputs": {"json": FORECAST}}])
def test_vllm_guided_json_fields_are_honoured(sdk, extra):
    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, seed=2, max_tokens=200, extra_body=extra)
    jsonschema.validate(json.loads(reply.choices[0].message.content), FORECAST)


def test_structured_outputs_choice_on_completions(http):
    r = http.post("/v1/completions", json={"model": "tiny-smol", "prompt": "Mood:", "max_tokens": 8, "seed": 3,
                                           "structured_outputs": {"choice": ["happy", "sad"]}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("happy", "sad")


@pytest.mark.parametrize("extra", [{"guided_regex": r"[A-Z]{2}-\d{3}( ok)?"},
                                   {"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}( ok)?"}}])
def test_vllm_guided_regex_replies_match_the_regex_whole(sdk, extra):
    import re

    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, n=4, seed=4, temperature=1.0,
                                        max_tokens=20, extra_body=extra)
    for choice in reply.choices:
        assert re.fullmatch(r"[A-Z]{2}-\d{3}( ok)?", choice.message.content), choice.message.content
        assert choice.finish_reason == "stop"


def test_string_lengths_patterns_and_integer_bounds_are_enforced(sdk):
    """A random model closes no string of its own accord: maxLength and the pattern close them."""
    schema = {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "tag": {"type": "string", "minLength": 1, "maxLength": 4},
        "month": {"type": "integer", "minimum": 1, "maximum": 12},
    }, "required": ["code", "tag", "month"], "additionalProperties": False}
    reply = sdk.chat.completions.create(model="tiny-smol", messages=QUESTION, n=4, seed=6, temperature=1.0,
                                        max_tokens=120, response_format=schema_format(schema))
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_bad_regex_is_a_400_naming_the_field(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny-smol", "messages": QUESTION, "max_tokens": 4,
                                                "guided_regex": "(?<=a)b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text


@pytest.mark.parametrize("extra", [
    {"guided_choice": ["a"], "guided_regex": "a"},
    {"structured_outputs": {"choice": ["a"], "regex": "a"}},
    {"guided_choice": ["a"], "guided_json": {}},
    {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
    {"structured_outputs": {"json": {}, "choice": ["a"]}},
    {"structured_outputs": {}},
    {"guided_choice": []},
])
def test_two_structures_at_once_are_a_400(http, extra):
    r = http.post("/v1/chat/completions", json={"model": "tiny-smol", "messages": QUESTION, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
