"""A real two-node Ray cluster on this machine (`ray start --head` plus a second `ray start
--address=...`, each a node with its own resources) with the kiln app on it: two engine
replicas, one per node, and one trainer. Package-scoped, and the e2e package's cluster is
torn down before this package starts, so the machine never runs two clusters at once."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.serve_process import serve_run, write_config

PORT = int(os.environ.get("KILN_MULTINODE_PORT", "8766"))
GCS_PORT = int(os.environ.get("KILN_MULTINODE_GCS_PORT", "6391"))
RAY = str(Path(sys.executable).parent / "ray")


@contextmanager
def two_node_cluster(temp_dir: str):
    """Head and worker as `ray start --block` processes; stopped by SIGTERM, and whatever is
    left of them (marked by the cluster's own temp dir in its command line) by SIGKILL."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--block", "--num-cpus=2", "--object-store-memory=800000000", "--disable-usage-stats",
              "--node-ip-address=127.0.0.1"]
    logs = [open(Path(temp_dir) / name, "w") for name in ("head.log", "worker.log")]
    procs = [subprocess.Popen([RAY, "start", "--head", f"--port={GCS_PORT}", "--include-dashboard=false",
                               f"--temp-dir={temp_dir}", *common], env=env, stdout=logs[0],
                              stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"127.0.0.1:{GCS_PORT}"
    try:
        _wait_nodes(address, 1, env)
        procs.append(subprocess.Popen([RAY, "start", f"--address={address}", *common], env=env, stdout=logs[1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        _wait_nodes(address, 2, env)
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and _leftovers(temp_dir):
            time.sleep(0.5)
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)
        for log in logs:
            log.close()


def _wait_nodes(address: str, count: int, env: dict, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True).stdout
        active = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
        if active.count("node_") >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s")


def _leftovers(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


@pytest.fixture(scope="package")
def multinode(default_model_dir):
    temp_dir = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with two_node_cluster(temp_dir) as address:
            config = write_config(Path(temp_dir) / "serve_config.multinode.yaml", PORT, {
                "model": str(default_model_dir),
                "home": str(Path(temp_dir) / "home"),  # one filesystem: both nodes see the adapter store
                "num_threads": 1,
                "engine": {"max_num_seqs": 8, "num_kv_blocks": 256},
                "training": {"num_threads": 1},
                "deploy": {"engine_replicas": 2, "engine_cpus": 1.0, "trainer_cpus": 0.5, "ingress_cpus": 0.25},
            })
            with serve_run(config, PORT, Path(temp_dir) / "serve.log", timeout=300, address=address) as base:
                yield base
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def replicas_health(base: str, want: int, polls: int = 60) -> dict[str, dict]:
    """/health from each engine replica (the router spreads calls over them), by replica id."""
    seen: dict[str, dict] = {}
    for _ in range(polls):
        info = httpx.get(f"{base}/health", timeout=30).json()
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    return seen
