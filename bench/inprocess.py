"""The in-process systems: kiln-ray's LLMEngine stepped directly (`kiln-ray-engine`) and
transformers `generate` (`transformers`). Same prompts (as token ids), greedy, exactly
`new_tokens` tokens; the times at which each token becomes available feed the same summary
as the HTTP servers."""

from __future__ import annotations

import time

import torch

from prompts import Prompt
from results import Run, summarize


def run_engine(engine, prompts: list[Prompt], new_tokens: int, model_name: str, dtype: str, tag: str) -> Run:
    from kiln_ray.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p.ids, params)
    times: dict[str, list[float]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            times[o.request_id].extend([now] * len(o.new_token_ids))
    return summarize("kiln-ray-engine", model_name, dtype, len(prompts), len(prompts[0].ids), new_tokens, start,
                     list(times.values()))


def run_transformers(hf_model, prompts: list[Prompt], new_tokens: int, model_name: str, dtype: str,
                     pad_id: int) -> Run:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    # Same-length prompts: no padding needed (left padding would be a no-op).
    ids = torch.tensor([p.ids for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    end = time.perf_counter()
    # A token is available when the step after its logits finishes; the last at `end`.
    step_done = clock.times[1:] + [end]
    token_times = [list(step_done) for _ in prompts]
    return summarize("transformers", model_name, dtype, len(prompts), len(prompts[0].ids), new_tokens, start,
                     token_times)
