"""ONE real Ray Serve instance for the whole e2e package (torn down before tests/multinode starts its cluster): `serve run` on a copy of
serve_config.yaml (the product path), on its own port, with the real default model and a
fresh kiln home (adapters) of its own.

Limits are lowered so that overload is reachable: 8 sequences run at once and 24 may wait
(a batch-completions call of 4 prompts x 6 fits; 40 concurrent requests do not). The load
drill (test_load.py) redeploys the app with higher limits for itself; the fault drills after
it do not depend on the limits.

The local Ray cluster `serve run` starts gets a Ray temp dir of its own (RAY_TMPDIR), so its
session dir (ports, Prometheus service discovery) is this cluster's, whatever other clusters
run on the machine.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.e2e.serve_process import serve_run, write_config

PORT = int(os.environ.get("KILN_E2E_PORT", "8765"))


@dataclass(frozen=True)
class Instance:
    base: str  # http://127.0.0.1:PORT
    config: Path  # the serve config it was started with
    ray_dir: Path  # RAY_TMPDIR of its Ray cluster: the session is ray_dir/ray/session_latest


@pytest.fixture(scope="package")
def instance(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    ray_dir = Path(tempfile.mkdtemp(prefix="kr-e2e-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    config = write_config(tmp / "serve_config.e2e.yaml", PORT, {
        "model": str(default_model_dir),  # already converted, so the fresh home needs no conversion
        "home": str(tmp / "home"),
        "engine": {"max_num_seqs": 8, "max_waiting_requests": 24, "num_kv_blocks": 2048},
    })
    try:
        with serve_run(config, PORT, tmp / "serve.log", env={"RAY_TMPDIR": str(ray_dir)}) as base:
            yield Instance(base, config, ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def serve_app(instance) -> str:
    return instance.base


@pytest.fixture(scope="package")
def client(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def model_id(client) -> str:
    return client.models.list().data[0].id


# Run after everything else in the package, in this order: the Ray metrics check (by then the
# earlier tests' figures have reached Ray's exporter, so it rarely waits), then the drills that
# stress or break the shared instance: load, then faults (each fault test waits until the
# instance has recovered).
_LAST = ("test_ray_metrics.py", "test_load.py", "test_faults.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name if item.path.parent.name == "e2e" else ""
        return _LAST.index(name) + 1 if name in _LAST else 0

    items.sort(key=rank)  # stable: the order within each group is kept
