"""When the engine outruns the ingress, AsyncLLMEngine hands over everything delivered since
the last batch at once: several increments of one choice in one batch. The engine boundary is
a scripted client that always answers that way (what a busy ingress sees), so the framing
above it is checked without depending on timing."""

import openai
import pytest
from fastapi.testclient import TestClient

from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray.config import KilnConfig
from kiln_ray.engine.request import RequestOutput
from kiln_ray.model.registry import load_tokenizer

ANSWERS = ["The sky is blue because of Rayleigh scattering.", "Grass is green: chlorophyll."]


class CoalescingEngine:
    """Answers choice i with the token ids of ANSWERS[i], one token per increment, every
    increment of every choice in a single batch."""

    def __init__(self, tokenizer):
        self.ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]

    async def generate(self, request, choice):
        batch = []
        for index in range(request.params.n):
            ids = self.ids[index]
            for i, token in enumerate(ids):
                batch.append(RequestOutput(request.request_id, index, [token], "length" if i == len(ids) - 1 else None,
                                           num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=i + 1))
        yield batch


@pytest.fixture(scope="module")
def sdk(default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    ctx = ServerContext(config=KilnConfig(model=str(default_model_dir)), engine=CoalescingEngine(tokenizer),
                        tokenizer=tokenizer, model_name="m", max_model_len=8192, vocab_size=49152)
    with TestClient(create_app(ctx)) as client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)


def test_a_streamed_chunk_has_one_entry_per_choice_with_all_its_new_text(sdk):
    chunks = [c for c in sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Why?"}], n=2,
                                                     stream=True) if c.choices]
    for chunk in chunks:
        indexes = [c.index for c in chunk.choices]
        assert len(indexes) == len(set(indexes)), indexes
    for index, answer in enumerate(ANSWERS):
        parts = [c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == index]
        assert "".join(parts) == answer
        finals = [c.finish_reason for chunk in chunks for c in chunk.choices if c.index == index and c.finish_reason]
        assert finals == ["length"]


def test_a_streamed_completion_chunk_has_one_entry_per_choice(sdk):
    chunks = list(sdk.completions.create(model="m", prompt="Why?", n=2, max_tokens=32, stream=True))
    for chunk in chunks:
        indexes = [c.index for c in chunk.choices]
        assert len(indexes) == len(set(indexes)), indexes
    assert ["".join(c.text for chunk in chunks for c in chunk.choices if c.index == i) for i in (0, 1)] == ANSWERS
