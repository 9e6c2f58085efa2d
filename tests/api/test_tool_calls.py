"""Tool calls through the API. A random model does not write tool-call markup, so the engine
boundary is replaced by a scripted client that emits the token ids of a fixed answer (split
into several increments, as the engine would); everything above it — template rendering with
tools, detokenizing, parsing, OpenAI framing — is the real code."""

import json

import openai
import pytest
from fastapi.testclient import TestClient

from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray.config import KilnConfig
from kiln_ray.engine.request import RequestOutput
from kiln_ray.model.registry import load_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANSWER = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ScriptedEngine:
    """Answers every request with the token ids of `text`, a few tokens per increment."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.answer(text)
        self.requests = []
        self.increments_sent = 0  # of the last request, before its stream ended or was closed

    def answer(self, text: str) -> None:
        self.ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, request, choice):
        self.requests.append(request)
        self.increments_sent = 0
        for i in range(0, len(self.ids), 3):
            chunk = self.ids[i:i + 3]
            done = i + 3 >= len(self.ids)
            self.increments_sent += 1
            yield [RequestOutput(request.request_id, 0, chunk, "stop" if done else None,
                                 num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=min(i + 3, len(self.ids)))]

    async def call(self, method, *args):
        return {"adapters": [], "default_adapter": None}

    async def info(self):
        return {"alive": True}


@pytest.fixture(scope="module")
def scripted(default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    engine = ScriptedEngine(tokenizer, ANSWER)
    ctx = ServerContext(config=KilnConfig(model=str(default_model_dir)), engine=engine, tokenizer=tokenizer,
                        model_name="m", max_model_len=8192, vocab_size=49152)
    with TestClient(create_app(ctx)) as client:
        yield client, engine, tokenizer


def test_tools_are_rendered_and_the_call_is_structured(scripted):
    client, engine, tokenizer = scripted
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    resp = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER_TOOL])
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert "get_weather" in prompt and "<tools>" in prompt
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_streamed_tool_call_arrives_as_one_delta(scripted):
    client, _, _ = scripted
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    chunks = list(sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}],
                                              tools=[WEATHER_TOOL], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check.\n"
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_markup_as_text(scripted):
    client, engine, tokenizer = scripted
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "tools": [WEATHER_TOOL], "tool_choice": "none"})
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert "tool_calls" not in body["choices"][0]["message"]
    assert "get_weather" not in tokenizer.decode(engine.requests[-1].prompt_token_ids)


TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_auto_tool_choice_parses_the_call(scripted):
    client, engine, tokenizer = scripted
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather?"}],
                                                   "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "auto"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert "get_weather" in prompt and "get_time" in prompt


@pytest.fixture
def answering(scripted):
    """The scripted client, made to answer with a given text for one test."""
    client, engine, tokenizer = scripted
    yield client, engine, tokenizer
    engine.answer(ANSWER)


TWO_CALLS = ('{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
             '</tool_call>\nDone.')
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_tool_choice_forces_exactly_one_call_to_that_function(answering, stream):
    """The prompt ends with the call's opening up to its arguments, so the model can only
    write arguments; the reply is that one call (the rest of the generation is cut off and
    the engine request ended early), and only the named function is offered."""
    client, engine, tokenizer = answering
    engine.answer(TWO_CALLS)
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL, TIME_TOOL],
                  tool_choice=NAMED)
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        message = (resp := sdk.chat.completions.create(**kwargs)).choices[0].message
        calls, content, finish = message.tool_calls, message.content or "", resp.choices[0].finish_reason
    assert finish == "tool_calls" and content == ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert "get_time" not in prompt
    assert engine.increments_sent < -(-len(engine.ids) // 3)  # closed before the scripted answer's end


def test_required_with_several_tools_lets_the_model_pick_the_function(answering):
    client, engine, tokenizer = answering
    engine.answer('get_time", "arguments": {}}\n</tool_call>')
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Time?"}],
                                                   "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [
        ("get_time", "{}")]
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.endswith('<tool_call>\n{"name": "') and "get_weather" in prompt and "get_time" in prompt


def test_required_with_one_tool_names_it_and_allows_parallel_calls(answering):
    client, engine, tokenizer = answering
    engine.answer(TWO_CALLS)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather?"}],
                                                   "tools": [WEATHER_TOOL], "tool_choice": "required"})
    choice = r.json()["choices"][0]
    assert tokenizer.decode(engine.requests[-1].prompt_token_ids).endswith('"name": "get_weather", "arguments": ')
    assert [json.loads(c["function"]["arguments"])["city"] for c in choice["message"]["tool_calls"]] == ["Paris", "Rome"]
    assert choice["message"]["content"].strip() == "Done." and choice["finish_reason"] == "tool_calls"


def test_parallel_tool_calls_false_keeps_the_first_call_only(answering):
    client, engine, _ = answering
    engine.answer('<tool_call>\n{"name": "get_weather", "arguments": ' + TWO_CALLS)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather?"}],
                                                   "tools": [WEATHER_TOOL], "parallel_tool_calls": False})
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris"]


def test_a_forced_call_the_model_leaves_unfinished_comes_back_as_text(answering):
    """Forcing the opening does not make the model close the call: when it ends without the
    closing tag, the reply is the raw text (the forced opening included) and no tool_calls."""
    client, engine, _ = answering
    engine.answer('{"city": "Par')
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather?"}],
                                                   "tools": [WEATHER_TOOL], "tool_choice": NAMED})
    choice = r.json()["choices"][0]
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'


def test_tool_results_and_assistant_calls_render(scripted):
    client, engine, tokenizer = scripted
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER_TOOL]})
    assert r.status_code == 200, r.text
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert "18C and sunny" in prompt and '"city": "Paris"' in prompt
