"""KilnEngine: the Serve deployment that owns an LLMEngine on one device.

Thin by design: it builds the engine from config, runs its step loop on a thread
(AsyncLLMEngine) and streams token increments to the ingress. Serve calls `check_health`
periodically; a dead step loop fails it, so Serve replaces the replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.serve import metrics as serve_metrics

from kiln_ray.api.engine_client import engine_info
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine, GenerateRequest
from kiln_ray.engine.engine import EngineStats, LLMEngine
from kiln_ray.engine.request import RequestOutput
from kiln_ray.metrics import Metrics
from kiln_ray.model.registry import served_model_name

log = logging.getLogger("kiln_ray.engine")


@serve.deployment(name="KilnEngine")
class KilnEngine:
    def __init__(self, config: dict):
        cfg = KilnConfig.model_validate(config)
        self.model_name = served_model_name(cfg)
        self.metrics = Metrics(ray_metrics=serve_metrics, prometheus=False)
        self._last_hits = 0
        self._last_preemptions = 0
        self.engine = AsyncLLMEngine(LLMEngine.from_config(cfg), on_step=self._on_step)
        log.info("KilnEngine ready: %s", engine_info(self.engine, self.model_name))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        async for batch in self.engine.generate(request):
            yield batch

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def info(self) -> dict:
        return engine_info(self.engine, self.model_name)

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the engine loop is dead: {self.engine.error!r}")

    def _on_step(self, stats: EngineStats, seconds: float) -> None:
        m = self.metrics
        m.set("kiln_running_requests", stats.running)
        m.set("kiln_waiting_requests", stats.waiting)
        m.set("kiln_kv_blocks_used", stats.kv_blocks_used)
        m.set("kiln_kv_blocks_total", stats.kv_blocks_total)
        m.observe("kiln_batch_size", stats.last_batch_seqs)
        m.observe("kiln_batch_tokens", stats.last_batch_tokens)
        m.inc("kiln_prefix_cache_hit_tokens_total", stats.prefix_cache_hit_tokens - self._last_hits)
        m.inc("kiln_preemptions_total", stats.num_preemptions - self._last_preemptions)
        self._last_hits, self._last_preemptions = stats.prefix_cache_hit_tokens, stats.num_preemptions
