"""The session dir of the e2e instance's local Ray cluster, where Ray writes what it chose at
start: the GCS port, and the Prometheus file-based service discovery (the `ip:port` targets a
Prometheus server scrapes: every node's metrics export port, and the dashboard's)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def session_dir(ray_dir: Path) -> Path:
    """ray_dir is the cluster's RAY_TMPDIR; Ray keeps its sessions in ray_dir/ray/."""
    return ray_dir / "ray" / "session_latest"


def metrics_targets(ray_dir: Path) -> list[str]:
    """`ip:port` of every metrics endpoint Ray lists for Prometheus."""
    groups = json.loads((session_dir(ray_dir) / "prom_metrics_service_discovery.json").read_text())
    return [target for group in groups for target in group["targets"]]


def gcs_address(ray_dir: Path) -> str:
    """`ip:port` of the cluster's GCS (what `ray.init(address=...)` and `serve run --address` take)."""
    (port_file,) = session_dir(ray_dir).glob("gcs_server_port_*")
    host = metrics_targets(ray_dir)[0].rpartition(":")[0]  # the head node's address
    return f"{host}:{port_file.read_text().strip()}"


def scrape(ray_dir: Path) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """target -> (series name, labels, value) of every sample it exports now, for every
    target that answers (as for Prometheus, a listed target may not be up)."""
    found = {}
    for target in metrics_targets(ray_dir):
        try:
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
        except httpx.TransportError:
            continue
        found[target] = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    return found
