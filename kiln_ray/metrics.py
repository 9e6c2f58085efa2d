"""Every kiln_* metric, defined once, recorded into one or two backends:

    prometheus   prometheus-client objects in a private registry, rendered at GET /metrics
    ray          Ray metric objects, which reach the Ray dashboard's Prometheus as ray_kiln_*

This module does not import Ray: the process that wants the Ray backend passes the module in.
Serve replicas (the ingress, the engine) pass `ray.serve.metrics`, which adds Serve's
application/deployment/replica labels inside a replica; the trainer, a plain actor and not a
replica, passes `ray.util.metrics` (same API, no Serve labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


DEFINITIONS = (
    # ingress: what clients see
    MetricDef("kiln_requests_total", "counter", "HTTP requests by route and status code", ("route", "status")),
    MetricDef("kiln_time_to_first_token_seconds", "histogram", "time to first token", buckets=LATENCY_BUCKETS),
    MetricDef("kiln_inter_token_latency_seconds", "histogram", "time between tokens of a stream", buckets=ITL_BUCKETS),
    MetricDef("kiln_e2e_request_latency_seconds", "histogram", "request latency, end to end", buckets=LATENCY_BUCKETS),
    MetricDef("kiln_prompt_tokens_total", "counter", "prompt tokens of finished requests"),
    MetricDef("kiln_generation_tokens_total", "counter", "generated tokens of finished requests"),
    # engine: what the batch looks like
    MetricDef("kiln_running_requests", "gauge", "sequences in the running batch"),
    MetricDef("kiln_waiting_requests", "gauge", "sequences waiting to be admitted"),
    MetricDef("kiln_batch_size", "histogram", "sequences per engine step", buckets=BATCH_BUCKETS),
    MetricDef("kiln_batch_tokens", "histogram", "tokens per engine step", buckets=BATCH_BUCKETS),
    MetricDef("kiln_kv_blocks_used", "gauge", "KV cache blocks in use"),
    MetricDef("kiln_kv_blocks_total", "gauge", "KV cache blocks in all"),
    MetricDef("kiln_prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache"),
    MetricDef("kiln_preemptions_total", "counter", "sequences preempted for lack of KV blocks"),
    # adapters: the hot swap
    MetricDef("kiln_adapter_swaps_total", "counter", "hot swaps: a new version made current for a name already served"),
    MetricDef("kiln_adapter_swap_seconds", "histogram", "publication received -> version served", buckets=LATENCY_BUCKETS),
    MetricDef("kiln_adapter_version", "gauge", "version new requests get, per adapter", ("adapter",)),
    # training
    MetricDef("kiln_training_jobs_total", "counter", "training jobs finished, by type and state", ("job_type", "state")),
    MetricDef("kiln_training_loss", "gauge", "latest step loss of the running job, per adapter", ("adapter",)),
    MetricDef("kiln_training_tokens_per_second", "gauge", "training throughput of the running job", ("adapter",)),
)


class Metrics:
    """Record by name: `metrics.inc("kiln_requests_total", route="/v1/chat/completions", status="200")`."""

    def __init__(self, ray_metrics: ModuleType | None = None, prometheus: bool = True):
        self.registry = prom.CollectorRegistry()
        self._prom: dict[str, Any] = {}
        self._ray: dict[str, Any] = {}
        for d in DEFINITIONS:
            if prometheus:
                self._prom[d.name] = _prometheus_metric(d, self.registry)
            if ray_metrics is not None:
                self._ray[d.name] = _ray_metric(d, ray_metrics)

    # to_ray=False: a figure the ingress copies from the engine for its own /metrics text; the
    # engine reports it to Ray itself, so the ingress must not report it again.
    def inc(self, name: str, amount: float = 1.0, *, to_ray: bool = True, **labels: str) -> None:
        if amount <= 0:
            return
        if name in self._prom:
            _labelled(self._prom[name], labels).inc(amount)
        if to_ray and name in self._ray:
            self._ray[name].inc(amount, tags=labels or None)

    def set(self, name: str, value: float, *, to_ray: bool = True, **labels: str) -> None:
        if name in self._prom:
            _labelled(self._prom[name], labels).set(value)
        if to_ray and name in self._ray:
            self._ray[name].set(value, tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        if name in self._prom:
            _labelled(self._prom[name], labels).observe(value)
        if name in self._ray:
            self._ray[name].observe(value, tags=labels or None)

    def render(self) -> bytes:
        """Prometheus text exposition of the prometheus backend."""
        return prom.generate_latest(self.registry)


def _labelled(metric: Any, labels: dict[str, str]) -> Any:
    return metric.labels(**labels) if labels else metric


def _prometheus_metric(d: MetricDef, registry: prom.CollectorRegistry) -> Any:
    # prometheus-client appends _total to counters itself.
    if d.kind == "counter":
        return prom.Counter(d.name.removesuffix("_total"), d.description, d.labels, registry=registry)
    if d.kind == "gauge":
        return prom.Gauge(d.name, d.description, d.labels, registry=registry)
    return prom.Histogram(d.name, d.description, d.labels, registry=registry, buckets=d.buckets)


def _ray_metric(d: MetricDef, ray_metrics: ModuleType) -> Any:
    if d.kind == "counter":
        return ray_metrics.Counter(d.name, description=d.description, tag_keys=d.labels)
    if d.kind == "gauge":
        return ray_metrics.Gauge(d.name, description=d.description, tag_keys=d.labels)
    return ray_metrics.Histogram(d.name, description=d.description, boundaries=list(d.buckets), tag_keys=d.labels)
