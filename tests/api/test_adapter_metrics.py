"""The adapter and training figures in /metrics: swaps and the served version per adapter
(the engine's own numbers), jobs and loss (the trainer's), rendered by the ingress."""

import re
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kiln_ray.metrics import DEFINITIONS
from tests.api.server import make_app
from tests.helpers import metric as sample

CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]


@pytest.fixture(scope="module")
def http(tiny_smol_dir, tmp_path_factory):
    app, engine = make_app(tiny_smol_dir, home=tmp_path_factory.mktemp("home"))
    with TestClient(app) as client:
        yield client
    engine.service.stop()
    engine.shutdown()


def metric(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def train_and_wait(http, adapter: str) -> None:
    """A 2-step SFT job into `adapter`, waited for (60 s at most)."""
    r = http.post("/v1/train/sft", json={"adapter": adapter, "examples": [{"messages": CONV}],
                                         "config": {"steps": 2, "early_stop_loss": None}})
    job = r.json()["job_id"]
    deadline = time.time() + 60
    while http.get(f"/v1/train/status/{job}").json()["state"] != "completed":
        assert time.time() < deadline
        time.sleep(0.05)


def test_swaps_and_served_versions_are_exported(http):
    before = http.get("/metrics").text
    assert metric(before, "kiln_adapter_swaps_total") in (None, 0.0)
    for expected_version in (1, 2):
        train_and_wait(http, "fact")
        text = http.get("/metrics").text
        assert metric(text, 'kiln_adapter_version{adapter="fact"}') == expected_version
        # the first version is a first load; the second one is a hot swap
        assert (metric(text, "kiln_adapter_swaps_total") or 0.0) == expected_version - 1


def test_every_kiln_metric_reaches_the_ingress_text_with_real_values(http):
    """Ingress, engine and trainer figures in one text: each definition has samples."""
    assert http.post("/v1/chat/completions", json={"messages": CONV[:1], "max_tokens": 3}).status_code == 200
    train_and_wait(http, "every")
    text = http.get("/metrics").text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    missing = [d.name for d in DEFINITIONS if not families.get(d.family)]
    assert not missing, f"no samples at /metrics for {missing}"
    assert sample(text, "kiln_batch_size_count") > 0 and sample(text, "kiln_batch_tokens_sum") > 0
    assert sample(text, "kiln_adapter_swap_seconds_count") >= 1
    assert sample(text, "kiln_adapter_version", adapter="every") == 1
    assert sample(text, "kiln_training_jobs_total", job_type="sft", state="completed") >= 1
    assert sample(text, "kiln_training_loss", adapter="every") > 0
    assert sample(text, "kiln_training_tokens_per_second", adapter="every") > 0
