"""ServingNode: a burst of requests for an adapter that is not resident waits for ONE read and
build of it; one waiter giving up does not cancel the load for the others."""

import asyncio

import pytest
import torch

from kiln_ray.adapters.store import AdapterNotFound, AdapterStore
from kiln_ray.config import EngineConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.model.loader import load_model
from kiln_ray.node import ServingNode
from tests.engine.test_adapters import random_adapter


@pytest.fixture()
def node(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    store = AdapterStore(tmp_path / "adapters")
    store.save_version("fact", *random_adapter(model, seed=1).to_peft())
    engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=64, max_loras=2, max_lora_rank=8)))
    node = ServingNode(engine, AdapterStore(tmp_path / "adapters", read_only=True), tmp_path / "state", None)
    builds = []
    real = node._load_weights
    node._load_weights = lambda name, version: (builds.append((name, version)), real(name, version))[1]
    yield node, builds
    engine.shutdown()


def test_concurrent_loads_of_one_adapter_build_it_once(node):
    node, builds = node

    async def burst():
        await asyncio.gather(*(node.load("fact", None) for _ in range(6)))
        return node._loading

    loading = asyncio.run(burst())
    assert builds == [("fact", None)]
    assert "fact" in node.engine.engine.adapters.current
    assert loading == {}  # nothing left in flight


def test_a_cancelled_waiter_leaves_the_load_to_the_others(node):
    node, builds = node

    async def one_gives_up():
        impatient = asyncio.ensure_future(node.load("fact", None))
        patient = asyncio.ensure_future(node.load("fact", None))
        await asyncio.sleep(0)  # both are waiting on the same load
        impatient.cancel()
        await patient
        return impatient

    impatient = asyncio.run(one_gives_up())
    assert impatient.cancelled()
    assert builds == [("fact", None)]
    assert "fact" in node.engine.engine.adapters.current


def test_a_failed_load_reaches_every_waiter_and_is_retried_next_time(node):
    node, builds = node

    async def burst(name):
        return await asyncio.gather(*(node.load(name, None) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(burst("missing"))
    assert all(isinstance(r, AdapterNotFound) for r in results)
    assert builds == [("missing", None)]
    asyncio.run(burst("missing"))
    assert builds == [("missing", None)] * 2  # a failure is not cached
