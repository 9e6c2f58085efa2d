"""Adapters in the engine: slots, pins and the hot swap (DESIGN §3).

Requests admitted before a swap finish on the old version, requests admitted after it use
the new one; slots are freed when their last request ends; nothing leaks."""

import random
import threading

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine.adapter_manager import AdapterManager, AdapterNotLoaded, AdapterSlotsFull
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model
from kiln_ray.model.lora import DEFAULT_TARGETS, LoraWeights, lora_sites
from tests.engine.greedy import run_to_completion

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def random_adapter(model, seed: int, rank: int = 4) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {
        key: (torch.randn(rank, site.in_features, generator=g) * 0.3, torch.randn(site.out_features, rank, generator=g) * 0.3)
        for key, site in lora_sites(model, DEFAULT_TARGETS).items()
    }
    return LoraWeights(rank, 2.0 * rank, modules)


@pytest.fixture()
def engine(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    return LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=300, max_loras=3, max_lora_rank=8))


def alone(engine, prompt, adapter=None, version=None):
    engine.add_request("alone", prompt, GREEDY, adapter, version)
    return run_to_completion(engine)["alone"][0]


def assert_idle(engine):
    s = engine.stats()
    assert s.running == s.waiting == s.kv_blocks_used == 0
    assert all(r["pins"] == 0 for r in engine.adapters.listing())


def test_adapters_change_the_output_and_base_requests_are_untouched(engine):
    prompt = [5, 6, 7, 8, 9, 10]
    base = alone(engine, prompt)
    engine.load_adapter("x", 1, random_adapter(engine.model, 1))
    with_x = alone(engine, prompt, "x")
    assert with_x != base
    assert alone(engine, prompt) == base
    with pytest.raises(AdapterNotLoaded):
        engine.add_request("r", prompt, GREEDY, "nope")
    with pytest.raises(AdapterNotLoaded):
        engine.add_request("r", prompt, GREEDY, "x", 7)


def test_swap_keeps_inflight_requests_on_old_version(engine):
    prompt = [11, 12, 13, 14]
    v1, v2 = random_adapter(engine.model, 1), random_adapter(engine.model, 2)
    engine.load_adapter("x", 1, v1)
    old_alone = alone(engine, prompt, "x")
    engine.load_adapter("x", 2, v2)
    new_alone = alone(engine, prompt, "x")
    assert old_alone != new_alone
    engine.load_adapter("x", 1, v1)  # back to v1, then swap to v2 mid-stream
    engine.add_request("before", prompt, GREEDY, "x")
    before = []
    for _ in range(4):
        before.extend(t for o in engine.step() for t in o.new_token_ids)
    assert 0 < len(before) < len(old_alone)  # the swap below lands mid-stream
    engine.load_adapter("x", 2, v2)
    engine.add_request("after", prompt, GREEDY, "x")
    outs = run_to_completion(engine)
    assert before + outs["before"][0] == old_alone  # admitted before the swap: all of it on v1
    assert outs["after"][0] == new_alone
    assert_idle(engine)


def test_stream_across_a_swap_yields_only_old_version_tokens(engine):
    prompt = [21, 22, 23, 24, 25]
    v1, v2 = random_adapter(engine.model, 3), random_adapter(engine.model, 4)
    engine.load_adapter("x", 1, v1)
    expected_old = alone(engine, prompt, "x")
    engine.add_request("s", prompt, GREEDY, "x")
    tokens = []
    for i in range(30):
        if i == 3:
            engine.load_adapter("x", 2, v2)  # between two steps, mid-stream
        for o in engine.step():
            tokens.extend(o.new_token_ids)
        if not engine.has_unfinished():
            break
    assert tokens == expected_old
    assert engine.adapters.current["x"] == 2
    assert [r["version"] for r in engine.adapters.listing()] == [2]  # v1's slot freed at the end
    assert_idle(engine)


def test_a_slot_is_filled_beside_the_steps_and_used_only_after_the_flip(engine):
    """The hot swap in three phases: reserve a free slot between steps, copy into it on
    another thread while steps run, flip between steps. Until the copy the reserved slot
    holds NaN, so a step that read it would show; requests admitted before the flip (also
    during the copy) finish on the old version, requests after it get the new one."""
    prompt = [31, 32, 33, 34]
    v1, v2 = random_adapter(engine.model, 1), random_adapter(engine.model, 2)
    base = alone(engine, prompt)
    engine.load_adapter("x", 2, v2)
    new = alone(engine, prompt, "x")
    engine.load_adapter("x", 1, v1)  # x@2 is dropped: nothing pins it
    old = alone(engine, prompt, "x")
    assert len({tuple(base), tuple(old), tuple(new)}) == 3

    tokens: dict[str, list[int]] = {}

    def step():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)

    engine.add_request("before", prompt, GREEDY, "x")
    engine.add_request("base", prompt, GREEDY)
    step()
    fill = engine.reserve_adapter_slot("x", 2, v2)
    assert fill.slot != engine.adapters.resolve("x").slot
    slots = engine.runner.adapter_slots
    for path in slots.a:  # a half-written slot
        slots.a[path][fill.slot].fill_(float("nan"))
        slots.b[path][fill.slot].fill_(float("nan"))
    engine.add_request("during", prompt, GREEDY, "x")
    with pytest.raises(AdapterNotLoaded):
        engine.add_request("too-early", prompt, GREEDY, "x", 2)
    step()
    copy = threading.Thread(target=engine.fill_adapter_slot, args=(fill, v2))
    copy.start()
    while copy.is_alive():  # steps go on beside the copy
        step()
    copy.join()
    step()
    assert engine.adapters.current["x"] == 1
    assert engine.commit_adapter_slot(fill) == fill.slot  # the flip
    engine.add_request("after", prompt, GREEDY, "x")
    for request_id, outs in run_to_completion(engine).items():
        tokens.setdefault(request_id, []).extend(outs[0])
    assert tokens["before"] == tokens["during"] == old
    assert tokens["base"] == base and tokens["after"] == new
    assert [r["version"] for r in engine.adapters.listing()] == [2]  # x@1 freed with its last request
    assert_idle(engine)


def test_an_unload_during_the_copy_wins(engine):
    w = random_adapter(engine.model, 3)
    fill = engine.reserve_adapter_slot("x", 1, w)
    engine.fill_adapter_slot(fill, w)
    engine.unload_adapter("x")
    assert engine.commit_adapter_slot(fill) is None
    assert engine.adapters.listing() == [] and not engine.adapters.filling
    with pytest.raises(AdapterNotLoaded):
        engine.add_request("r", [1, 2, 3], GREEDY, "x")


def test_sixteen_streams_and_twenty_swaps(engine):
    rng = random.Random(0)
    versions = [random_adapter(engine.model, 100 + i) for i in range(4)]
    engine.load_adapter("x", 1, versions[0])
    finished, swaps, next_id, version = 0, 0, 0, 1
    while finished < 40 or swaps < 20:
        while len(engine.requests) < 16 and next_id < 40:
            adapter = "x" if next_id % 4 else None
            params = SamplingParams(max_tokens=rng.randint(3, 15), temperature=0.8, seed=next_id, ignore_eos=True)
            engine.add_request(f"r{next_id}", [rng.randint(3, 200) for _ in range(rng.randint(2, 20))], params, adapter)
            next_id += 1
        for o in engine.step():
            if o.finished:
                assert o.finish_reason == "length"
                finished += 1
        if swaps < 20 and rng.random() < 0.5:
            try:
                engine.load_adapter("x", version + 1, versions[(version + 1) % 4])
            except AdapterSlotsFull:  # every slot pinned by running requests: try later
                continue
            version += 1
            swaps += 1
    assert swaps == 20 and finished == 40
    assert_idle(engine)
    assert [r["version"] for r in engine.adapters.listing()] == [version]
    assert engine.adapters.num_swaps == 20


def test_prefix_cache_is_per_adapter_version(engine):
    prompt = list(range(30, 60))  # 30 tokens = 7 full blocks of 4
    engine.load_adapter("x", 1, random_adapter(engine.model, 5))
    alone(engine, prompt, "x")
    hits = engine.stats().prefix_cache_hit_tokens
    engine.load_adapter("x", 2, random_adapter(engine.model, 6))
    alone(engine, prompt, "x")
    assert engine.stats().prefix_cache_hit_tokens == hits  # nothing reused across versions
    alone(engine, prompt, "x")
    assert engine.stats().prefix_cache_hit_tokens == hits + 28  # reused within a version


def test_all_slots_pinned_refuses_a_new_adapter(engine):
    for i in range(3):
        engine.load_adapter(f"a{i}", 1, random_adapter(engine.model, i))
        engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), f"a{i}")
    with pytest.raises(AdapterSlotsFull):
        engine.load_adapter("late", 1, random_adapter(engine.model, 9))
    for i in range(3):
        engine.abort(f"r{i}")
    engine.load_adapter("late", 1, random_adapter(engine.model, 9))  # an idle one is evicted
    assert len(engine.adapters.listing()) == 3


def install(m, name, version, make_current=True):
    return m.commit(m.reserve(name, version, make_current))


def test_adapter_manager_bookkeeping():
    m = AdapterManager(num_slots=2)
    a1 = install(m, "a", 1)
    assert (a1.slot, m.resolve("a").version) == (0, 1)
    m.pin(a1)
    a2 = install(m, "a", 2)  # swap while v1 is pinned
    assert a2.slot == 1 and m.resolve("a").version == 2 and m.is_resident("a", 1)
    m.pin(a2)
    with pytest.raises(AdapterSlotsFull):
        m.reserve("b", 1, True)  # both slots pinned
    m.unpin(a1)
    assert not m.is_resident("a", 1)  # freed with its last pin
    m.unpin(a2)
    assert install(m, "b", 1).slot == 0
    assert m.reserve("c", 1, True).slot == 1 and not m.is_resident("a", 2)  # idle current, least recently used: evicted


def test_a_slot_being_filled_is_never_handed_out_or_resolved():
    m = AdapterManager(num_slots=3)
    old = install(m, "a", 1)
    m.pin(old)
    fill = m.reserve("a", 2, make_current=True)
    other = m.reserve("b", 1, make_current=True)
    assert len({old.slot, fill.slot, other.slot}) == 3
    with pytest.raises(AdapterSlotsFull):
        m.reserve("c", 1, True)  # one slot pinned, two being filled: none to give
    assert m.resolve("a").version == 1  # until the flip
    with pytest.raises(AdapterNotLoaded):
        m.resolve("a", 2)
    assert m.commit(fill).slot == fill.slot and m.resolve("a").version == 2
    m.abandon(other)
    assert m.reserve("c", 1, True).slot == other.slot  # given back unused


def test_an_unload_during_the_copy_frees_the_slot_at_commit():
    m = AdapterManager(num_slots=1)
    fill = m.reserve("a", 1, make_current=True)
    m.unload("a")
    assert m.commit(fill) is None
    assert not m.is_resident("a", 1) and "a" not in m.current
    assert m.reserve("b", 1, True).slot == fill.slot


def test_loading_a_resident_version_again_is_a_no_op(engine):
    """Two first requests for a non-resident adapter may race to load it: the second load
    must not drop the first's (possibly pinned) slot."""
    w = random_adapter(engine.model, 11)
    slot = engine.load_adapter("x", 1, w)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), "x")
    engine.step()
    assert engine.load_adapter("x", 1, w) == slot  # no AssertionError, same slot, still pinned
    assert engine.adapters.resolve("x").pins == 1
    run_to_completion(engine)
    assert_idle(engine)


def test_a_recreated_adapter_never_reuses_the_old_ones_kv(engine):
    """Delete x and create a new x@1: its prefix-cache key differs from the old x@1's."""
    prompt = list(range(30, 60))
    engine.load_adapter("x", 1, random_adapter(engine.model, 5))
    alone(engine, prompt, "x")
    old_key = engine.adapters.resolve("x").cache_key
    engine.unload_adapter("x")
    engine.load_adapter("x", 1, random_adapter(engine.model, 6))
    assert engine.adapters.resolve("x").cache_key != old_key
    hits = engine.stats().prefix_cache_hit_tokens
    alone(engine, prompt, "x")
    assert engine.stats().prefix_cache_hit_tokens == hits


def test_an_adapter_for_another_model_is_refused_before_any_slot_changes(engine):
    wrong = random_adapter(engine.model, 7)
    key = next(iter(wrong.modules))
    a, b = wrong.modules[key]
    wrong.modules[key] = (torch.cat([a, a], dim=1), b)  # A's input width of another model
    engine.load_adapter("keep", 1, random_adapter(engine.model, 8))
    engine.load_adapter("keep2", 1, random_adapter(engine.model, 9))
    engine.load_adapter("keep3", 1, random_adapter(engine.model, 10))
    with pytest.raises(ValueError, match="another base model"):
        engine.load_adapter("bad", 1, wrong)
    assert {r["name"] for r in engine.adapters.listing()} == {"keep", "keep2", "keep3"}  # nothing evicted
