"""EngineMetrics: the engine's kiln_* figures (recorder "engine" in kiln_ray/metrics.py).

    on_step        the loop thread, after every step: sequences and tokens of the batch,
                   running / waiting, KV blocks, prefix-cache hit tokens, preemptions
    on_publication the event loop, once a publication is served: swap latency, swaps,
                   the version each adapter serves
    families       the event loop, when the ingress renders /metrics: the gauges refreshed
                   from the latest stats first (an abort frees blocks without a step), then
                   a snapshot the ingress renders as its own

One object per engine, held by its ServingNode, in a KilnEngine replica (with the Ray
backend: every figure is reported to Ray from here) and in process alike. prometheus-client
objects are thread-safe; each running total below is touched by one thread only.
"""

from __future__ import annotations

from types import ModuleType

from prometheus_client.metrics_core import Metric

from kiln_ray.engine.adapter_manager import AdapterManager
from kiln_ray.engine.engine import EngineStats
from kiln_ray.metrics import Metrics


class EngineMetrics:
    def __init__(self, ray_metrics: ModuleType | None = None):
        self.metrics = Metrics("engine", ray_metrics)
        self._steps = self._hits = self._preemptions = 0  # loop thread
        self._swaps = 0  # event loop
        self._versions: dict[str, int] = {}  # event loop: adapter -> the version last reported

    def on_step(self, stats: EngineStats, seconds: float) -> None:
        """The AsyncLLMEngine's `on_step` hook. A step that scheduled nothing (stats.steps did
        not move) observes no batch. The step time itself is no kiln_* metric."""
        m = self.metrics
        self._set_gauges(stats)
        if stats.steps > self._steps:
            self._steps = stats.steps
            m.observe("kiln_batch_size", stats.last_batch_seqs)
            m.observe("kiln_batch_tokens", stats.last_batch_tokens)
        m.inc("kiln_prefix_cache_hit_tokens_total", stats.prefix_cache_hit_tokens - self._hits)
        m.inc("kiln_preemptions_total", stats.num_preemptions - self._preemptions)
        self._hits, self._preemptions = stats.prefix_cache_hit_tokens, stats.num_preemptions

    def on_publication(self, adapters: AdapterManager, seconds: float | None) -> None:
        """A publication is served; `seconds` from its arrival, None for a retirement (nothing
        was swapped in)."""
        if seconds is not None:
            self.metrics.observe("kiln_adapter_swap_seconds", seconds)
        self._report_adapters(adapters)

    def families(self, stats: EngineStats, adapters: AdapterManager) -> list[Metric]:
        """Everything recorded so far, with the gauges as of `stats` and `adapters`."""
        self._set_gauges(stats)
        self._report_adapters(adapters)
        return self.metrics.families()

    def _set_gauges(self, stats: EngineStats) -> None:
        m = self.metrics
        m.set("kiln_running_requests", stats.running)
        m.set("kiln_waiting_requests", stats.waiting)
        m.set("kiln_kv_blocks_used", stats.kv_blocks_used)
        m.set("kiln_kv_blocks_total", stats.kv_blocks_total)

    def _report_adapters(self, adapters: AdapterManager) -> None:
        self.metrics.inc("kiln_adapter_swaps_total", adapters.num_swaps - self._swaps)
        self._swaps = max(self._swaps, adapters.num_swaps)
        # Compositions ("~" in the name) are built on the fly per request: not series of their own.
        current = {name: v for name, v in dict(adapters.current).items() if "~" not in name}
        for name in self._versions.keys() - current.keys():
            self.metrics.set("kiln_adapter_version", 0, adapter=name)
        for name, version in current.items():
            if self._versions.get(name) != version:
                self.metrics.set("kiln_adapter_version", version, adapter=name)
        self._versions = current
