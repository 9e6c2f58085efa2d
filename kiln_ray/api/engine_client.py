"""How the ingress reaches the engine: the EngineClient protocol, and its in-process
implementation (tests, single-process use). The Ray implementation, over a streaming
DeploymentHandle, lives in kiln_ray/api/ingress.py."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Protocol

from kiln_ray.engine.async_engine import GenerateRequest
from kiln_ray.engine.request import RequestOutput
from kiln_ray.node import AdapterChoice, ServingNode

# ServingNode methods the ingress may call (admin, adapters, training, metrics).
NODE_METHODS = frozenset({
    "adapter_listing", "lora_shape", "load", "unload", "delete", "download", "train_submit", "train_status", "train_jobs",
    "train_queue", "train_cancel", "train_rollback", "train_import", "train_merge",
    "metric_families",
})


class EngineClient(Protocol):
    def generate(self, request: GenerateRequest, choice: AdapterChoice) -> AsyncIterator[list[RequestOutput]]:
        """Outputs in batches until every sequence finished; leaving early aborts."""

    async def call(self, method: str, *args):
        """One of NODE_METHODS on the engine's ServingNode."""

    async def info(self) -> dict:
        """Static facts (model, dtype, device, limits) and live stats of the engine."""


def engine_info(node: ServingNode, model_name: str) -> dict:
    """What /health and /v1/models report about an engine (plain JSON-able values)."""
    engine = node.engine
    e = engine.engine
    stats = engine.stats()
    return {
        "model": model_name,
        "architecture": e.model.config.architecture,
        "dtype": str(e.model.dtype).removeprefix("torch."),
        "device": str(e.device),
        "max_model_len": e.max_model_len,
        "vocab_size": e.model.config.vocab_size,
        "prefix_caching": e.prefix_caching,
        "alive": engine.is_alive(),
        "error": None if engine.error is None else repr(engine.error),
        "running": stats.running,
        "waiting": stats.waiting,
        "kv_blocks_used": stats.kv_blocks_used,
        "kv_blocks_total": stats.kv_blocks_total,
        "state_slots_used": stats.state_slots_used,
        "state_slots_total": stats.state_slots_total,
        "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
        "num_preemptions": stats.num_preemptions,
        "steps": stats.steps,
        "last_batch_seqs": stats.last_batch_seqs,
        "last_batch_tokens": stats.last_batch_tokens,
        "peak_batch_seqs": stats.peak_batch_seqs,
        "adapters_resident": e.adapters.listing(),
        "adapters_serving": dict(e.adapters.current),  # name -> the version new requests get
        "adapter_swaps": e.adapters.num_swaps,
        "default_adapter": node.default_adapter,
        "training": node.training is not None,
    }


class LocalEngineClient:
    """The engine (a ServingNode) in this process."""

    def __init__(self, node: ServingNode, model_name: str):
        self.node = node
        self.model_name = model_name

    def generate(self, request: GenerateRequest, choice: AdapterChoice) -> AsyncIterator[list[RequestOutput]]:
        return self.node.generate(request, choice)

    async def call(self, method: str, *args):
        return await call_node(self.node, method, *args)

    async def info(self) -> dict:
        return engine_info(self.node, self.model_name)


async def call_node(node: ServingNode, method: str, *args):
    """Run a whitelisted ServingNode method, awaiting it if it is a coroutine."""
    if method not in NODE_METHODS:
        raise ValueError(f"unknown engine method {method!r}")
    result = getattr(node, method)(*args)
    return await result if inspect.isawaitable(result) else result
