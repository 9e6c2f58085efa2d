"""How the ingress reaches the engine: the EngineClient protocol, and its in-process
implementation (tests, single-process use). The Ray implementation, over a streaming
DeploymentHandle, lives in kiln_ray/api/ingress.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kiln_ray.engine.async_engine import AsyncLLMEngine, GenerateRequest
from kiln_ray.engine.request import RequestOutput


class EngineClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """Outputs in batches until every sequence finished; leaving early aborts."""

    async def abort(self, request_id: str) -> None: ...

    async def info(self) -> dict:
        """Static facts (model, dtype, device, limits) and live stats of the engine."""


def engine_info(engine: AsyncLLMEngine, model_name: str) -> dict:
    """What /health and /v1/models report about an engine (plain JSON-able values)."""
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
    }


class LocalEngineClient:
    """The engine in this process."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        return self.engine.generate(request)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def info(self) -> dict:
        return engine_info(self.engine, self.model_name)
