"""Every kiln_* metric, defined once, recorded by the process that sees it happen:

    ingress   what clients see: requests, latencies, tokens      kiln_ray/api/
    engine    what the batch looks like, KV blocks, adapters      kiln_ray/engine_metrics.py
    trainer   training jobs, loss, throughput                     kiln_ray/training/service.py

Each recorder keeps its figures in two backends:

    prometheus   prometheus-client objects in a private registry; the ingress renders its own
                 and the engine's and trainer's latest `families()` at GET /metrics
    ray          ray.serve.metrics / ray.util.metrics objects, reported from the recording
                 process itself, which reach the Ray dashboard's Prometheus

so every figure reaches Ray once, and /metrics shows all of them. This module does not import
Ray: the process that wants the Ray backend passes the metrics module in (actors/,
kiln_ray/api/ingress.py).

Serve replicas (the ingress, the engine) pass `ray.serve.metrics`, which adds Serve's
application/deployment/replica labels inside a replica; the trainer, a plain actor and not a
replica, passes `ray.util.metrics` (same API, no Serve labels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import prometheus_client as prom
from prometheus_client.metrics_core import Metric

Recorder = Literal["ingress", "engine", "trainer"]

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    recorder: Recorder
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    @property
    def family(self) -> str:
        """The prometheus-client family name (it appends _total to a counter's samples)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


DEFINITIONS = (
    # ingress: what clients see
    MetricDef("kiln_requests_total", "counter", "HTTP requests by route and status code", "ingress", ("route", "status")),
    MetricDef("kiln_time_to_first_token_seconds", "histogram", "time to first token", "ingress", buckets=LATENCY_BUCKETS),
    MetricDef("kiln_inter_token_latency_seconds", "histogram", "time between tokens of a stream", "ingress",
              buckets=ITL_BUCKETS),
    MetricDef("kiln_e2e_request_latency_seconds", "histogram", "request latency, end to end", "ingress",
              buckets=LATENCY_BUCKETS),
    MetricDef("kiln_prompt_tokens_total", "counter", "prompt tokens of finished requests", "ingress"),
    MetricDef("kiln_generation_tokens_total", "counter", "generated tokens of finished requests", "ingress"),
    # engine: what the batch looks like
    MetricDef("kiln_running_requests", "gauge", "sequences in the running batch", "engine"),
    MetricDef("kiln_waiting_requests", "gauge", "sequences waiting to be admitted", "engine"),
    MetricDef("kiln_batch_size", "histogram", "sequences per engine step", "engine", buckets=BATCH_BUCKETS),
    MetricDef("kiln_batch_tokens", "histogram", "tokens per engine step", "engine", buckets=BATCH_BUCKETS),
    MetricDef("kiln_kv_blocks_used", "gauge", "KV cache blocks in use", "engine"),
    MetricDef("kiln_kv_blocks_total", "gauge", "KV cache blocks in all", "engine"),
    MetricDef("kiln_prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache", "engine"),
    MetricDef("kiln_preemptions_total", "counter", "sequences preempted for lack of KV blocks", "engine"),
    # adapters: the hot swap
    MetricDef("kiln_adapter_swaps_total", "counter", "hot swaps: a new version made current for a name already served",
              "engine"),
    MetricDef("kiln_adapter_swap_seconds", "histogram", "publication received -> version served", "engine",
              buckets=LATENCY_BUCKETS),
    MetricDef("kiln_adapter_version", "gauge", "version new requests get, per adapter (0: not served)", "engine",
              ("adapter",)),
    # training
    MetricDef("kiln_training_jobs_total", "counter", "training jobs finished, by type and state", "trainer",
              ("job_type", "state")),
    MetricDef("kiln_training_loss", "gauge", "latest step loss of the running job, per adapter", "trainer", ("adapter",)),
    MetricDef("kiln_training_tokens_per_second", "gauge", "training throughput of the running job", "trainer",
              ("adapter",)),
)


class Metrics:
    """The figures of one recorder, by name: `metrics.inc("kiln_requests_total", route="/v1/models", status="200")`.
    Recording a metric of another recorder raises KeyError: each figure has one owner."""

    def __init__(self, recorder: Recorder, ray_metrics: ModuleType | None = None, prometheus: bool = True):
        self.recorder = recorder
        self.registry = prom.CollectorRegistry()
        self._prom: dict[str, Any] = {}
        self._ray: dict[str, Any] = {}
        for d in DEFINITIONS:
            if d.recorder != recorder:
                continue
            if prometheus:
                self._prom[d.name] = _prometheus_metric(d, self.registry)
            if ray_metrics is not None:
                self._ray[d.name] = _ray_metric(d, ray_metrics)
        self._own = {d.name for d in DEFINITIONS if d.recorder == recorder}
        self._foreign = {d.family for d in DEFINITIONS if d.recorder != recorder}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._check(name)
        if amount <= 0:
            return
        if name in self._prom:
            _labelled(self._prom[name], labels).inc(amount)
        if name in self._ray:
            self._ray[name].inc(amount, tags=labels or None)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._check(name)
        if name in self._prom:
            _labelled(self._prom[name], labels).set(value)
        if name in self._ray:
            self._ray[name].set(value, tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._check(name)
        if name in self._prom:
            _labelled(self._prom[name], labels).observe(value)
        if name in self._ray:
            self._ray[name].observe(value, tags=labels or None)

    def _check(self, name: str) -> None:
        if name not in self._own:
            raise KeyError(f"{name!r} is not a metric the {self.recorder} records")

    def families(self) -> list[Metric]:
        """A snapshot of the prometheus backend (picklable: it crosses to the ingress)."""
        return list(self.registry.collect())

    def render(self, others: Iterable[Metric] = ()) -> bytes:
        """Prometheus text of this recorder's figures and of `others`: the other recorders'
        `families()`. Only families of other recorders' metrics are taken from them, so a name
        never appears twice."""
        received = [f for f in others if f.name in self._foreign]
        return prom.generate_latest(_Families([*self.registry.collect(), *received]))


class _Families:
    """A prometheus-client collector over fixed families."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _labelled(metric: Any, labels: dict[str, str]) -> Any:
    return metric.labels(**labels) if labels else metric


def _prometheus_metric(d: MetricDef, registry: prom.CollectorRegistry) -> Any:
    if d.kind == "counter":
        return prom.Counter(d.family, d.description, d.labels, registry=registry)
    if d.kind == "gauge":
        return prom.Gauge(d.name, d.description, d.labels, registry=registry)
    return prom.Histogram(d.name, d.description, d.labels, registry=registry, buckets=d.buckets)


def _ray_metric(d: MetricDef, ray_metrics: ModuleType) -> Any:
    if d.kind == "counter":
        return ray_metrics.Counter(d.name, description=d.description, tag_keys=d.labels)
    if d.kind == "gauge":
        return ray_metrics.Gauge(d.name, description=d.description, tag_keys=d.labels)
    return ray_metrics.Histogram(d.name, description=d.description, boundaries=list(d.buckets), tag_keys=d.labels)
