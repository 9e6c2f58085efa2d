"""The adapter figures in /metrics: swaps and the served version per adapter (the engine's
own numbers, copied by the ingress at each scrape)."""

import re
import time

import pytest
from fastapi.testclient import TestClient

from tests.api.server import make_app

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


def test_swaps_and_served_versions_are_exported(http):
    before = http.get("/metrics").text
    assert metric(before, "kiln_adapter_swaps_total") in (None, 0.0)
    for expected_version in (1, 2):
        r = http.post("/v1/train/sft", json={"adapter": "fact", "examples": [{"messages": CONV}],
                                             "config": {"steps": 2, "early_stop_loss": None}})
        job = r.json()["job_id"]
        deadline = time.time() + 60
        while http.get(f"/v1/train/status/{job}").json()["state"] != "completed":
            assert time.time() < deadline
            time.sleep(0.05)
        text = http.get("/metrics").text
        assert metric(text, 'kiln_adapter_version{adapter="fact"}') == expected_version
        # the first version is a first load; the second one is a hot swap
        assert (metric(text, "kiln_adapter_swaps_total") or 0.0) == expected_version - 1
