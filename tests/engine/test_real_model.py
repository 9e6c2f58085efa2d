"""The engine on the real default model (SmolLM2-135M-Instruct, fp32) against transformers."""

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model
from tests.engine.greedy import assert_same_greedy, hf_greedy_batch, run_to_completion

pytestmark = pytest.mark.real_model

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What do bees make?",
    "Explain photosynthesis in one sentence.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 30?",
]
TEXT_PROMPTS = [
    "The history of the printing press begins",
    "In mathematics, a prime number is a natural number greater than one that",
    " ".join(["Rivers carry water from the mountains to the sea."] * 12),  # > 1 prefill chunk
    "def fibonacci(n):\n    ",
    " ".join(["A list of fruits: apple, banana, cherry, date, elderberry, fig, grape."] * 9),
    "Once upon a time",
    "The three laws of thermodynamics are",
    "Q: What is the boiling point of water at sea level?\nA:",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(default_model_dir):
    return load_model(default_model_dir, torch.float32, "cpu")


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_chat_answers_match_transformers_generate(model, hf_model, tokenizer):
    """All 32 tokens of every answer: EOS is masked on both sides (min_tokens, min_new_tokens),
    so no answer ends early and each is compared in full."""
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, max_num_seqs=8))
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=32, temperature=0.0, min_tokens=32))
    outs = run_to_completion(engine)
    eos = model.config.eos_token_ids[0]
    refs = hf_greedy_batch(hf_model, prompts, 32, pad_token_id=eos)
    for i, p in enumerate(prompts):
        assert len(outs[str(i)][0]) == len(refs[i]) == 32
        assert_same_greedy(outs[str(i)][0], refs[i], hf_model, p, CHAT_PROMPTS[i], masked_ids=[eos])
    assert "Paris" in tokenizer.decode(outs["0"][0])
    assert engine.stats().kv_blocks_used == 0


def test_sixteen_concurrent_mixed_requests_equal_each_alone(model, hf_model, tokenizer):
    """Chat and raw-text prompts (two longer than the 64-token step budget), chunked prefill
    interleaved with decodes: every batched answer equals its answer alone and transformers',
    and again when the KV cache is so small that requests are preempted and recomputed."""
    engine = LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=512, max_num_batched_tokens=64))
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS] + [tokenizer(t)["input_ids"] for t in TEXT_PROMPTS]
    assert max(len(p) for p in prompts) > 64
    params = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=16)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    batched = run_to_completion(engine)
    for i, p in enumerate(prompts):
        engine.add_request(f"alone{i}", p, params)
        assert run_to_completion(engine)[f"alone{i}"][0] == batched[str(i)][0], f"prompt {i}: batched != alone"
    eos = model.config.eos_token_ids[0]
    refs = hf_greedy_batch(hf_model, prompts, 16, pad_token_id=eos)
    for i, p in enumerate(prompts):
        assert_same_greedy(batched[str(i)][0], refs[i], hf_model, p, f"prompt {i}", masked_ids=[eos])
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.peak_batch_seqs == 16  # they did run together

    starved = LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=24, max_num_batched_tokens=64))
    some = [*range(6), 10]  # six chat prompts (~7 blocks each) and a 121-token text (17 blocks)
    for i in some:
        starved.add_request(str(i), prompts[i], params)
    assert run_to_completion(starved) == {str(i): batched[str(i)] for i in some}
    stats = starved.stats()
    assert stats.num_preemptions > 0, "24 blocks of 8 tokens held all 7 requests: nothing was preempted"
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population_millions": {"type": "number"},
                   "is_capital": {"type": "boolean"}},
    "required": ["city", "country", "population_millions", "is_capital"],
}


def test_a_json_schema_guide_makes_the_real_model_answer_in_that_schema(model, tokenizer, default_model_dir):
    """Left alone, SmolLM2 fills the fields as it likes (seen greedy: "is_capital": "Paris") or
    wraps the JSON in prose and markdown fences; guided, each answer is one document
    that validates, with strings the model chose itself, and then EOS."""
    import json

    import jsonschema

    from kiln_ray.engine.guide import Guide
    from kiln_ray.engine.json_grammar import compile_schema

    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, max_num_seqs=4), tokenizer_path=default_model_dir)
    prompt = chat_ids(tokenizer, "Describe Paris as JSON with the keys city, country, population_millions, is_capital.")
    guide = Guide(compile_schema(CITY), after="stop")
    engine.add_request("free", prompt, SamplingParams(max_tokens=120, temperature=0.0))
    engine.add_request("guided", prompt, SamplingParams(max_tokens=120, temperature=0.0, guide=guide))
    engine.add_request("sampled", prompt, SamplingParams(max_tokens=120, temperature=0.8, seed=1, n=2, guide=guide))
    out = run_to_completion(engine)
    free = tokenizer.decode(out["free"][0], skip_special_tokens=True)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(free), CITY)  # not a valid document: the guide is what makes it one
    for request_id, index in (("guided", 0), ("sampled", 0), ("sampled", 1)):
        ids = out[request_id][index]
        assert ids[-1] in engine.eos_token_ids, f"{request_id}/{index} did not end at EOS"
        answer = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
        jsonschema.validate(answer, CITY)
        assert "paris" in answer["city"].lower()


def test_a_preloaded_vocabulary_is_read_once_and_off_the_step_thread(model, tokenizer, default_model_dir):
    """LLMEngine.from_config preloads the token bytes, so the first guided request does not
    stall every stream while the tokenizer is read."""
    import threading

    from kiln_ray.engine.guide import Guide
    from kiln_ray.engine.json_grammar import choice

    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=2), tokenizer_path=default_model_dir)
    readers, read = [], engine._read_vocabulary
    engine._read_vocabulary = lambda: (readers.append(threading.current_thread().name), read())[1]
    engine.preload_vocabulary()
    guide = Guide(choice(["yes", "no"]), after="stop")
    for request_id in ("a", "b"):
        engine.add_request(request_id, chat_ids(tokenizer, "Is Paris in France?"),
                           SamplingParams(max_tokens=8, temperature=0.0, guide=guide))
    out = run_to_completion(engine)
    assert len(readers) == 1 and readers[0].startswith("kiln-vocabulary"), readers
    assert {tokenizer.decode(out[r][0], skip_special_tokens=True) for r in ("a", "b")} <= {"yes", "no"}


def test_token_bytes_that_cannot_be_read_are_reported_at_once_and_read_again_later(model, tmp_path, caplog):
    import logging
    import time

    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=2), tokenizer_path=tmp_path / "no-tokenizer")
    with caplog.at_level(logging.WARNING, logger="kiln_ray.engine"):
        engine.preload_vocabulary()
        deadline = time.monotonic() + 30
        while engine._vocabulary_reader is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert engine._vocabulary_reader is None  # the next guided request reads again, not the stored failure
    assert "could not be read" in caplog.text
