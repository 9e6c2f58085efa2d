"""Shared test helpers (plain functions, no fixtures)."""

import torch


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error: ||actual - expected||_2 / ||expected||_2 (fp64)."""
    a, e = actual.double(), expected.double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, frozenset of its labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample of a /metrics text, None if it is not there."""
    return metric_samples(text).get((name, frozenset(labels.items())))


def observations_above(text: str, histogram: str, bound: float) -> float:
    """How many observations of a histogram exceed `bound` (one of its bucket boundaries)."""
    samples = metric_samples(text)
    below = samples.get((f"{histogram}_bucket", frozenset({("le", str(float(bound)))})), 0.0)
    return samples.get((f"{histogram}_count", frozenset()), 0.0) - below
