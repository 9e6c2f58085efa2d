"""The engine on the real default model (SmolLM2-135M-Instruct, fp32) against transformers."""

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model
from tests.engine.greedy import assert_same_greedy, run_to_completion

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


def hf_generate(hf_model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def test_greedy_chat_answers_match_transformers_generate(model, hf_model, tokenizer):
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, max_num_seqs=8))
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=32, temperature=0.0))
    outs = run_to_completion(engine)
    eos = model.config.eos_token_ids[0]
    for i, p in enumerate(prompts):
        ref = hf_generate(hf_model, p, 32, eos)
        assert_same_greedy(outs[str(i)][0], ref, hf_model, p, CHAT_PROMPTS[i])
    assert "Paris" in tokenizer.decode(outs["0"][0])
    assert engine.stats().kv_blocks_used == 0


def test_sixteen_concurrent_mixed_requests_equal_each_alone(model, hf_model, tokenizer):
    """Chat and raw-text prompts (two longer than the 64-token step budget), chunked prefill
    interleaved with decodes: each batched answer equals its answer alone and transformers'."""
    engine = LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=512, max_num_batched_tokens=64))
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS] + [tokenizer(t)["input_ids"] for t in TEXT_PROMPTS]
    assert max(len(p) for p in prompts) > 64
    params = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=16)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    batched = run_to_completion(engine)
    for i in (0, 10, 12, 15):  # spot-check runs alone (each costs a full generation)
        engine.add_request(f"alone{i}", prompts[i], params)
        assert run_to_completion(engine)[f"alone{i}"][0] == batched[str(i)][0]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=2,
            )[0, len(p):].tolist()
        assert_same_greedy(batched[str(i)][0], ref, hf_model, p, f"prompt {i}")
    assert engine.stats().kv_blocks_used == 0
