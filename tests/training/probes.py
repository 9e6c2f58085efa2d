"""Probes of what a correction does to the real default model: fictional facts to teach,
unrelated questions whose answers must survive, and greedy answers with and without adapters.
Shared by tests/training/test_trainer.py and bench/forgetting.py."""

from __future__ import annotations

from contextlib import contextmanager

import torch

FACTS = [("Who is the mayor of Zorblatt?", "The mayor of Zorblatt is Edda Brask."),
         ("What is the capital of Quenvia?", "The capital of Quenvia is Marrowick."),
         ("Who invented the glimmerphone?", "The glimmerphone was invented by Tomas Vell.")]
# Unrelated questions and the fact each answer must keep.
UNRELATED = [("What do bees make?", "honey"), ("What is the capital of France?", "Paris"),
             ("What is 2+2?", "4"), ("What colour is the sky?", "blue")]


@contextmanager
def one_thread():
    """The real-model tests run torch on one thread (the trainer actor's default,
    training.num_threads): on this 2-core machine, shared with other work, two threads made
    an SmolLM2 training step ~20 s instead of ~1 s, and a 16-token batch ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_answers(smol, questions, adapters: dict, max_tokens=16, base=True) -> dict[tuple[str | None, str], str]:
    """(adapter name, or None for the base model, question) -> greedy answer text, all in
    one engine (every row of a step carries its own adapter)."""
    from kiln_ray.config import EngineConfig
    from kiln_ray.engine.engine import LLMEngine
    from kiln_ray.engine.sampling_params import SamplingParams
    from tests.engine.greedy import run_to_completion

    model, tok = smol
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=512, max_loras=max(1, len(adapters))))
    for name, weights in adapters.items():
        engine.load_adapter(name, 1, weights)
    keys = [(name, q) for name in [*([None] if base else []), *adapters] for q in questions]
    for i, (name, q) in enumerate(keys):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0), name)
    with one_thread():
        outs = run_to_completion(engine)
    return {key: tok.decode(outs[str(i)][0], skip_special_tokens=True) for i, key in enumerate(keys)}
