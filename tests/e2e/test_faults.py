"""Faults on the real Serve instance: the engine replica's process killed mid-stream, the
trainer killed mid-job. Each test waits until the instance has recovered (it runs after the
rest of the package: see conftest.py) and reports the seconds to recovery."""

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.test_serve import health

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

ASK = [{"role": "user", "content": "Who repaired the Zorblatt bridge?"}]
CONV = [*ASK, {"role": "assistant", "content": "Olek Varn repaired the Zorblatt bridge."}]


def train(base, adapter, timeout=300, **config):
    body = {"adapter": adapter, "examples": [{"messages": CONV}],
            "config": {"steps": 2, "learning_rate": 1e-3, "early_stop_loss": None, **config}}
    r = httpx.post(f"{base}/v1/train/sft", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def job_status(base, job_id) -> dict | None:
    r = httpx.get(f"{base}/v1/train/status/{job_id}", timeout=30)
    if r.status_code == 503:  # the trainer is being started again
        assert r.json()["error"]["code"] == "trainer_unavailable" and r.headers.get("retry-after")
        return None
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(base, job_id, states=("completed", "failed", "cancelled"), timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(base, job_id)
        if status is not None and status["state"] in states:
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {states}: {status}")


def answer(base, model, timeout=60) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": ASK, "max_tokens": 12, "temperature": 0})


def listing(base, name) -> dict:
    r = httpx.get(f"{base}/v1/adapters", timeout=30)
    assert r.status_code == 200, r.text
    return next(a for a in r.json()["adapters"] if a["name"] == name)


def current_neither_first_nor_latest(base, name) -> int:
    """Versions 1 and 2 trained, 3 uploaded (v1's weights), then a rollback to 2: a restart
    that loaded the first version, or the latest, would serve the wrong one."""
    for _ in range(2):
        assert wait_job(base, train(base, name))["state"] == "completed"
    first = httpx.get(f"{base}/v1/adapters/{name}/download", params={"version": 1}, timeout=60)
    assert first.status_code == 200, first.text
    r = httpx.post(f"{base}/v1/adapters/upload", files={"file": ("v1.tar.gz", first.content, "application/gzip")},
                   data={"name": name}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 3, r.text
    r = httpx.post(f"{base}/v1/adapters/{name}/rollback", json={"version": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["current_version"] == 2, r.text
    entry = listing(base, name)
    assert (entry["current_version"], entry["serving_version"]) == (2, 2)
    assert [v["version"] for v in entry["versions"]] == [1, 2, 3]
    return 2


def test_killing_the_engine_mid_stream(serve_app):
    current = current_neither_first_nor_latest(serve_app, "survivor")
    before = answer(serve_app, "survivor").json()["choices"][0]["message"]["content"]
    old_pid = health(serve_app)["memory"]["engine"]["pid"]

    events, ended = [], threading.Event()

    def stream():
        body = {"model": "survivor", "messages": ASK, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as error:
            events.append(f"transport: {type(error).__name__}")
        ended.set()

    threading.Thread(target=stream, daemon=True).start()
    deadline = time.time() + 60
    while len(events) < 5 and time.time() < deadline:
        time.sleep(0.05)
    assert len(events) >= 5, "the stream never started"
    os.kill(old_pid, signal.SIGKILL)
    killed = time.time()

    assert ended.wait(60), "the client was left hanging"
    errors = [json.loads(e)["error"] for e in events if e.startswith("{") and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == "engine_unavailable", events[-3:]  # a clean, typed error event

    statuses = []
    while True:  # until a request succeeds again
        try:
            r = answer(serve_app, "survivor", timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text  # never a 500 while it recovers
        except httpx.TimeoutException:
            statuses.append("timeout")
        assert time.time() - killed < 240, f"no recovery in 240 s: {statuses[-5:]}"
        time.sleep(0.5)
    recovery = time.time() - killed
    info = health(serve_app)
    print(f"\nengine killed mid-stream: the client got an engine_unavailable event; requests succeeded "
          f"again after {recovery:.1f} s (meanwhile: {sorted(set(map(str, statuses)))})")
    assert info["memory"]["engine"]["pid"] != old_pid  # a new replica process
    assert info["adapters_serving"].get("survivor") == current  # the current version, reloaded from the store
    assert listing(serve_app, "survivor")["serving_version"] == current
    assert r.json()["choices"][0]["message"]["content"] == before


def test_killing_the_trainer_mid_job(serve_app):
    job = train(serve_app, "survivor", steps=1000, early_stop_loss=0)  # null would mean the default, 0.05
    deadline = time.time() + 180  # the trainer of a fresh replica may still be warming up
    while not ((status := job_status(serve_app, job)) and status["state"] == "running" and status["losses"]):
        assert time.time() < deadline, status
        time.sleep(0.2)
    entry = listing(serve_app, "survivor")
    version, latest = entry["current_version"], max(v["version"] for v in entry["versions"])
    before = answer(serve_app, "survivor").json()["choices"][0]["message"]["content"]

    os.kill(health(serve_app)["memory"]["trainer"]["now"]["pid"], signal.SIGKILL)
    killed = time.time()
    failed = wait_job(serve_app, job, timeout=240)
    recovery = time.time() - killed
    assert failed["state"] == "failed" and "trainer process stopped" in failed["error"], failed
    print(f"\ntrainer killed mid-job: the job reads failed ({failed['error'][:60]}...) after {recovery:.1f} s")

    # the previous version kept serving, unchanged
    assert health(serve_app)["adapters_serving"]["survivor"] == version
    r = answer(serve_app, "survivor")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == before
    # and the next job runs
    done = wait_job(serve_app, train(serve_app, "survivor"))
    assert done["state"] == "completed" and done["adapter_version"] == latest + 1
