"""Two engine replicas on two Ray nodes, one trainer: every adapter version the trainer
publishes reaches both replicas before the job counts as completed, unloads reach both too,
the publish-to-all latency is measured, and a replica started again after a kill serves the
current versions it loads from the store."""

import os
import signal
import time

import httpx

from tests.multinode.conftest import replicas_health

CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]


def test_two_replicas_on_two_nodes_and_one_trainer(multinode):
    replicas = replicas_health(multinode, 2)
    assert len(replicas) == 2, "the router never reached a second engine replica"
    nodes = {r["placement"]["engine"]["node_id"] for r in replicas.values()}
    assert len(nodes) == 2
    leaders = [r for r in replicas.values() if r["placement"]["trainer_leader"]]
    assert len(leaders) == 1  # one trainer for the application, in one replica's bundle
    trainers = {r["placement"]["trainer"]["placement_group"] for r in replicas.values()}
    assert len(trainers) == 1


def train(base: str, adapter: str) -> dict:
    """Submit a 3-step SFT job on CONV; its final status."""
    body = {"adapter": adapter, "examples": [{"messages": CONV}],
            "config": {"steps": 3, "learning_rate": 1e-3, "early_stop_loss": None}}
    r = httpx.post(f"{base}/v1/train/sft", json=body, timeout=60)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    deadline = time.time() + 240
    while True:
        status = httpx.get(f"{base}/v1/train/status/{job_id}", timeout=30).json()
        if status["state"] in ("completed", "failed", "cancelled"):
            return status
        assert time.time() < deadline, status
        time.sleep(0.5)


def test_every_published_version_is_served_by_both_replicas(multinode):
    status = train(multinode, "fanout")
    assert status["state"] == "completed", status
    version = status["adapter_version"]

    # "completed" means served: every replica, asked right away, already serves the version.
    replicas = replicas_health(multinode, 2)
    assert len(replicas) == 2
    for replica, info in replicas.items():
        assert info["adapters_serving"].get("fanout") == version, (replica, info["adapters_serving"])

    stats = next(r for r in replicas.values() if r["placement"]["trainer_leader"])["placement"]["publications"]
    live = [c for c, s in stats["consumers"].items() if s["live"]]
    assert sorted(live) == sorted(replicas)
    print(f"\npublish -> both replicas serving: last {stats['publish_to_all_ms_last']} ms, "
          f"p50 {stats['publish_to_all_ms_p50']} ms over {stats['publications']} publications")
    assert stats["publications"] >= 1
    # measured, and short of the trainer's ack timeout (120 s): both replicas acknowledged it
    assert stats["publish_to_all_ms_last"] is not None and 0 < stats["publish_to_all_ms_last"] < 30_000

    # a request for the adapter works whichever replica takes it
    for _ in range(4):
        r = httpx.post(f"{multinode}/v1/chat/completions", timeout=60, json={
            "model": "fanout", "messages": CONV[:1], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text

    # unloading goes to one replica; the trainer's retire publication reaches the other
    r = httpx.post(f"{multinode}/v1/adapters/unload", json={"name": "fanout"}, timeout=60)
    assert r.status_code == 200, r.text
    for replica, info in replicas_health(multinode, 2).items():
        assert "fanout" not in info["adapters_serving"], (replica, info["adapters_serving"])


def test_a_replica_started_again_serves_the_current_versions_from_the_store(multinode):
    """The replica without the trainer is killed; Serve starts a new one, which has seen no
    publication of `restart` and must load its current version (2: trained, then an upload
    of v1's weights) from the store."""
    assert train(multinode, "restart")["state"] == "completed"
    v1 = httpx.get(f"{multinode}/v1/adapters/restart/download", params={"version": 1}, timeout=60)
    r = httpx.post(f"{multinode}/v1/adapters/upload", files={"file": ("v1.tar.gz", v1.content, "application/gzip")},
                   data={"name": "restart"}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    replicas = replicas_health(multinode, 2)
    assert len(replicas) == 2
    (victim,) = [rid for rid, info in replicas.items() if not info["placement"]["trainer_leader"]]
    os.kill(replicas[victim]["memory"]["engine"]["pid"], signal.SIGKILL)
    killed = time.time()

    deadline = killed + 240
    while True:
        seen = replicas_health(multinode, 2, polls=10)
        fresh = [rid for rid in seen if rid not in replicas]
        if fresh:
            break
        assert time.time() < deadline, "Serve did not start a new engine replica"
        time.sleep(1)
    print(f"\nkilled replica {victim}; a new replica answered after {time.time() - killed:.0f} s")
    assert seen[fresh[0]]["adapters_serving"].get("restart") == 2, seen[fresh[0]]["adapters_serving"]
