"""LLMEngine: continuous batching gives the same tokens as running alone and as transformers,
under chunked prefill, preemption, forking and aborts, and gives every block and state slot
back. Tiny random-weight models of each architecture, fp32."""

import math

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine.engine import EngineFullError, LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model
from tests.engine.greedy import assert_same_greedy, hf_greedy, run_to_completion
from tests.model.tiny import ARCHITECTURES

# 16 prompts of mixed lengths; several are longer than the 16-token step budget, so their
# prefill is chunked and interleaves with other requests' decodes.
PROMPT_LENS = [3, 40, 9, 17, 1, 33, 5, 26, 12, 48, 2, 21, 7, 30, 15, 37]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def make_engine(path, **overrides) -> LLMEngine:
    cfg = dict(block_size=4, num_kv_blocks=400, max_num_batched_tokens=16, max_num_seqs=16)
    cfg.update(overrides)
    return LLMEngine(load_model(path, torch.float32, "cpu"), EngineConfig(**cfg))


def greedy(max_tokens=NEW_TOKENS, **kw) -> SamplingParams:
    """Greedy for exactly max_tokens: EOS masked until then, as transformers' min_new_tokens does."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=max_tokens, **kw)


def assert_idle(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.running == stats.waiting == 0
    assert stats.kv_blocks_used == 0, "KV blocks leaked"
    assert stats.state_slots_used == 0, "state slots leaked"
    assert not engine.requests


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_equals_alone_and_transformers(arch, tiny_model_dirs, prompts):
    path, hf = tiny_model_dirs[arch]
    engine = make_engine(path)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy())
    batched = run_to_completion(engine)
    assert engine.stats().steps < len(prompts) * NEW_TOKENS  # they really ran together
    assert_idle(engine)
    for i, p in enumerate(prompts):
        engine.add_request(f"alone-{i}", p, greedy())
        alone = run_to_completion(engine)[f"alone-{i}"][0]
        assert batched[str(i)][0] == alone, f"request {i}: batched != alone"
        assert_same_greedy(alone, hf_greedy(hf, p, NEW_TOKENS), hf, p, f"{arch} request {i}")
    assert_idle(engine)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preemption_recomputes_and_keeps_outputs(arch, tiny_model_dirs, prompts):
    path, _ = tiny_model_dirs[arch]
    reference = make_engine(path)
    starved = make_engine(path, num_kv_blocks=24)  # 96 token slots for 16 requests
    for engine in (reference, starved):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy())
    expected = run_to_completion(reference)
    got = run_to_completion(starved)
    assert starved.stats().num_preemptions > 0, "the KV budget was meant to force preemption"
    assert got == expected
    assert_idle(starved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [2, 3])
def test_hybrid_state_survives_tiny_step_budgets_and_preemption(dtype, budget, tiny_model_dirs, prompts):
    """Budgets of 2 and 3 tokens split every prompt into many chunks (one token beside a decode), so
    each linear-attention layer carries its conv and recurrent state across dozens of steps,
    and a starved KV cache preempts requests mid-prefill. Same tokens as the plain engine, in
    bf16 too (the serving dtype, where the C state kernels run)."""
    path, _ = tiny_model_dirs["qwen3_5"]
    model = load_model(path, dtype, "cpu")
    reference = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=400, max_num_batched_tokens=64, max_num_seqs=1))
    starved = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=16, max_num_batched_tokens=budget, max_num_seqs=16))
    for engine in (reference, starved):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy())
    expected = run_to_completion(reference)
    got = run_to_completion(starved)
    assert starved.stats().num_preemptions > 0, "the KV budget was meant to force preemption"
    assert got == expected
    assert_idle(starved)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_abort_frees_everything(arch, tiny_model_dirs, prompts):
    path, _ = tiny_model_dirs[arch]
    engine = make_engine(path)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(max_tokens=50, n=2 if i % 3 == 0 else 1))
    for _ in range(6):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    for i in range(len(prompts)):
        assert engine.abort(str(i))
    assert not engine.abort("never-added")
    assert_idle(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_seeded_sampling_is_the_same_alone_and_in_a_batch(arch, tiny_model_dirs, prompts):
    path, _ = tiny_model_dirs[arch]
    engine = make_engine(path)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    engine.add_request("alone", prompts[3], params)
    alone = run_to_completion(engine)["alone"][0]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
    engine.add_request("seeded", prompts[3], params)
    assert run_to_completion(engine)["seeded"][0] == alone
    # A different seed gives a different continuation (12 tokens at temperature 0.9).
    engine.add_request("other", prompts[3], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert run_to_completion(engine)["other"][0] != alone


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_n_siblings_fork_the_prompt_and_match_separate_seeded_requests(arch, tiny_model_dirs, prompts):
    """n=4 prefills once; sibling i samples like a lone request with seed + i."""
    path, _ = tiny_model_dirs[arch]
    engine = make_engine(path)
    base = dict(max_tokens=8, temperature=1.0, ignore_eos=True)
    engine.add_request("group", prompts[5], SamplingParams(n=4, seed=50, **base))
    steps_before = engine.stats().steps
    group = run_to_completion(engine)["group"]
    assert sorted(group) == [0, 1, 2, 3]
    # The prompt (33 tokens, budget 16) prefills in 3 steps, then 7 decode steps for all four.
    assert engine.stats().steps - steps_before == 3 + 7
    for i in range(4):
        engine.add_request(f"single-{i}", prompts[5], SamplingParams(seed=50 + i, **base))
        assert run_to_completion(engine)[f"single-{i}"][0] == group[i], f"sibling {i}"
    assert len({tuple(t) for t in group.values()}) > 1
    assert_idle(engine)


def test_prefix_cache_reuses_a_long_shared_prefix(tiny_model_dirs, prompts):
    path, hf = tiny_model_dirs["llama"]
    engine = make_engine(path)
    shared = prompts[9]  # 48 tokens = 12 blocks of 4
    engine.add_request("first", shared + [5, 6], greedy())
    first = run_to_completion(engine)
    engine.add_request("second", shared + [7, 8, 9], greedy())
    second = run_to_completion(engine)["second"][0]
    assert engine.stats().prefix_cache_hit_tokens == 48
    assert_same_greedy(second, hf_greedy(hf, shared + [7, 8, 9], NEW_TOKENS), hf, shared + [7, 8, 9], "prefix hit")
    assert first


def test_prefix_caching_is_off_for_hybrid_models(tiny_model_dirs):
    engine = make_engine(tiny_model_dirs["qwen3_5"][0])
    assert not engine.prefix_caching
    with pytest.raises(ValueError, match="hybrid"):
        make_engine(tiny_model_dirs["qwen3_5"][0], enable_prefix_caching=True)


def test_stops_on_eos_and_stop_tokens_and_reports_the_reason(tiny_model_dirs, prompts):
    engine = make_engine(tiny_model_dirs["llama"][0])
    plain = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.add_request("free", prompts[2], SamplingParams(**plain))
    free_run = run_to_completion(engine)["free"][0]
    stop_at = free_run[4]
    engine.add_request("stop", prompts[2], SamplingParams(**plain, stop_token_ids=(stop_at,)))
    engine.add_request("length", prompts[2], SamplingParams(**{**plain, "max_tokens": 3}))
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = (o.finish_reason, o.num_output_tokens)
    first_stop = free_run.index(stop_at)
    assert finals["stop"] == ("stop", first_stop + 1)
    assert finals["length"] == ("length", 3)


def test_ignore_eos_generates_past_eos_and_min_tokens_holds_it_back(tiny_model_dirs, prompts):
    """A logit_bias makes EOS (id 2) the certain next token of every step."""
    engine = make_engine(tiny_model_dirs["llama"][0])
    eos = dict(max_tokens=5, temperature=0.0, logit_bias={2: 100.0})
    cases = {
        "default": SamplingParams(**eos),
        "ignore_eos": SamplingParams(**eos, ignore_eos=True),
        "ignore_eos+stop_id": SamplingParams(**eos, ignore_eos=True, stop_token_ids=(2,)),
        "min_tokens": SamplingParams(**eos, min_tokens=3),
    }
    for name, params in cases.items():
        engine.add_request(name, prompts[2], params)
    tokens, reasons = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            reasons[o.request_id] = o.finish_reason
    assert (reasons["default"], tokens["default"]) == ("stop", [2])
    assert (reasons["ignore_eos"], tokens["ignore_eos"]) == ("length", [2] * 5)
    assert (reasons["ignore_eos+stop_id"], tokens["ignore_eos+stop_id"]) == ("stop", [2])  # stop ids still stop
    assert reasons["min_tokens"] == "stop"
    assert len(tokens["min_tokens"]) == 4 and tokens["min_tokens"][3] == 2 and 2 not in tokens["min_tokens"][:3]
    assert_idle(engine)


def test_logprobs_are_log_softmax_of_the_model_logits(tiny_model_dirs, prompts):
    path, hf = tiny_model_dirs["qwen3"]
    engine = make_engine(path)
    prompt = prompts[4] + prompts[6]
    engine.add_request("lp", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.new_token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1], dim=-1)
    for k, lp in enumerate(logprobs):
        assert lp.token_id == tokens[k]
        assert lp.logprob == pytest.approx(ref[k, tokens[k]].item(), abs=1e-4)
        top_ids = [t for t, _ in lp.top]
        assert top_ids == ref[k].topk(3).indices.tolist()
        assert lp.top[0][1] == pytest.approx(ref[k].max().item(), abs=1e-4)


def test_rejects_bad_requests_and_a_full_queue(tiny_model_dirs):
    engine = make_engine(tiny_model_dirs["llama"][0], max_num_seqs=1, max_waiting_requests=1, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], greedy())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("b", [1, 256], greedy())
    with pytest.raises(ValueError, match="context limit of 64"):
        engine.add_request("c", [5] * 60, greedy(max_tokens=5))
    engine.add_request("d", [5, 6], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("d", [5, 6], greedy())
    engine.add_request("e", [5, 6], greedy())
    with pytest.raises(EngineFullError):
        engine.add_request("f", [5, 6], greedy())


@pytest.mark.parametrize(
    "extreme",
    [{"top_k": 2**63}, {"temperature": 1e-300}, {"repetition_penalty": 1e-308}],
    ids=["top_k-2**63", "temperature-1e-300", "repetition_penalty-1e-308"],
)
def test_extreme_sampling_values_keep_the_engine_stepping_with_finite_logprobs(tiny_model_dirs, prompts, extreme):
    """Values the API accepts at the edge of their range: a top_k past int64 once killed the
    engine loop, and logits divided by a denormal temperature or penalty became inf (NaN
    logprobs, which JSON cannot carry)."""
    engine = make_engine(tiny_model_dirs["llama"][0])
    params = SamplingParams(**{"max_tokens": 6, "ignore_eos": True, "logprobs": 2, **extreme})
    engine.add_request("x", prompts[2], params)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    logprobs = [lp for o in outs for lp in o.logprobs]
    assert len(logprobs) == 6
    assert all(math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top) for lp in logprobs)
    if "temperature" in extreme:  # vanishing temperature is greedy, not noise
        engine.add_request("greedy", prompts[2], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))
        assert run_to_completion(engine)["greedy"][0] == [lp.token_id for lp in logprobs]
    assert_idle(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied output head; separate lm_head
def test_bf16_engine_on_amx_serves_from_the_one_copy_of_the_weights(arch, tiny_model_dirs):
    """On an AMX CPU the engine keeps no packed copy of any projection or of the output head,
    even with `prepack_weights` on (the default): it serves bf16 from the very weights it
    loaded (the ones it shares with the trainer)."""
    from kernels.linear import amx_available
    from kiln_ray.model.layers import Linear

    if not amx_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no AMX here: the engine packs the weights for oneDNN instead")
    model = load_model(tiny_model_dirs[arch][0], torch.bfloat16, "cpu")
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16, max_num_seqs=4))
    assert engine.config.prepack_weights
    assert [name for name, m in model.named_modules() if isinstance(m, Linear) and m.packed is not None] == []
    assert model.packed_tied_head is None
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage
    engine.add_request("r", [5, 9, 17, 33], greedy(6))
    assert len(run_to_completion(engine)["r"][0]) == 6
    assert_idle(engine)
