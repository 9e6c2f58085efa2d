"""TrainingService: the job queue, the store's writes, publications and webhooks (no Ray)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from kiln_ray.adapters.store import AdapterStore
from kiln_ray.model.loader import load_model
from kiln_ray.training.data import TokenizedExample
from kiln_ray.training.service import Job, JobState, QueueFull, TrainingService
from kiln_ray.training.trainer import Trainer, TrainConfig

EXAMPLES = [TokenizedExample([5, 9, 13, 17, 21, 40, 41, 42], [False] * 5 + [True] * 3)]
QUICK = TrainConfig(learning_rate=1e-2, steps=3, early_stop_loss=None, lora_rank=4, lora_alpha=8)


@pytest.fixture()
def service(tiny_model_dirs, tmp_path):
    published = []
    svc = TrainingService(Trainer(load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")),
                          AdapterStore(tmp_path / "adapters"), published.append, max_queued_jobs=2)
    svc.published = published
    svc.start()
    yield svc
    svc.stop()


def wait(svc, job_id, states=("completed", "failed", "cancelled"), timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = svc.status(job_id)
        if status["state"] in states:
            return status
        time.sleep(0.02)
    raise AssertionError(svc.status(job_id))


def sft(adapter="fact", **config):
    raw = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    return Job("sft", adapter, TrainConfig(**{**QUICK.__dict__, **config}), examples=EXAMPLES, raw_examples=raw)


def test_a_job_writes_a_version_records_examples_and_publishes(service):
    job = service.submit(sft())
    status = wait(service, job.job_id)
    assert status["state"] == "completed" and status["adapter_version"] == 1
    assert len(status["losses"]) == 3 and status["progress"] == 1.0
    assert [p.version for p in service.published] == [1]
    assert service.store.current_version("fact") == 1
    assert service.store.load_examples("fact")[0]["input_ids"] == EXAMPLES[0].input_ids
    second = service.submit(sft())
    assert wait(service, second.job_id)["adapter_version"] == 2
    meta = service.store.meta("fact")
    assert meta["versions"][2]["parent"] == 1 and meta["versions"][2]["job_id"] == second.job_id


def test_queue_limit_cancel_and_order(service):
    long = service.submit(sft("a", steps=200))
    wait(service, long.job_id, states=("running",))
    queued = [service.submit(sft("b")), service.submit(sft("c"))]
    with pytest.raises(QueueFull):
        service.submit(sft("d"))
    assert service.cancel(queued[0].job_id)["state"] == "cancelled"
    service.cancel(long.job_id)
    assert wait(service, long.job_id)["state"] == "cancelled"
    assert wait(service, queued[1].job_id)["state"] == "completed"
    assert not service.store.exists("a") and not service.store.exists("b")  # nothing saved for them


def test_a_failing_job_is_failed_and_the_next_one_runs(service, monkeypatch):
    calls = []
    original = service.trainer.run_sft

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated OOM")
        return original(*args, **kwargs)

    monkeypatch.setattr(service.trainer, "run_sft", flaky)
    bad, good = service.submit(sft("x")), service.submit(sft("y"))
    assert wait(service, bad.job_id)["error"] == "RuntimeError: simulated OOM"
    assert wait(service, good.job_id)["state"] == "completed"


def test_disk_full_while_saving_fails_the_job_and_keeps_the_old_version(service, monkeypatch):
    first = service.submit(sft())
    wait(service, first.job_id)
    import kiln_ray.adapters.store as store_module

    def full(*args, **kwargs):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_write_bytes", full)
    second = service.submit(sft())
    status = wait(service, second.job_id)
    assert status["state"] == "failed" and "saving the adapter failed" in status["error"]
    assert service.store.current_version("fact") == 1
    assert service.store.load_version("fact").version == 1


def test_publish_every_k_steps_serves_intermediate_versions(service):
    job = service.submit(sft(steps=5, publish_every=2))
    wait(service, job.job_id)
    assert [p.version for p in service.published] == [1, 2, 3]  # after steps 2 and 4, then final


def test_webhook_posts_the_final_status(tiny_model_dirs, tmp_path):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    svc = TrainingService(Trainer(load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")),
                          AdapterStore(tmp_path / "a"), lambda p: None,
                          webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
    svc.start()
    try:
        job = svc.submit(sft())
        wait(svc, job.job_id)
        deadline = time.time() + 10
        while not received and time.time() < deadline:
            time.sleep(0.05)
        assert received and received[0]["job_id"] == job.job_id and received[0]["state"] == "completed"
    finally:
        svc.stop()
        server.shutdown()


def test_rollback_serves_an_older_version(service):
    for _ in range(2):
        wait(service, service.submit(sft()).job_id)
    service.rollback("fact", 1)
    assert service.store.current_version("fact") == 1
    assert service.published[-1].version == 1


def test_jobs_outlive_the_trainer_process(tiny_model_dirs, tmp_path):
    """Job statuses are journaled; a job that was running when its process died is failed,
    with the reason, in the next process."""
    def start():
        svc = TrainingService(Trainer(load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")),
                              AdapterStore(tmp_path / "adapters"), lambda p: None, journal_dir=tmp_path / "jobs")
        svc.start()
        return svc

    first = start()
    done = first.submit(sft())
    assert wait(first, done.job_id)["state"] == "completed"
    running = first.submit(sft(steps=100_000))
    wait(first, running.job_id, states=("running",))
    first.journal = None  # the process "dies": nothing more reaches the disk
    first.cancel(running.job_id)
    first.stop()

    second = start()
    try:
        assert second.status(done.job_id)["state"] == "completed"
        assert second.status(done.job_id)["adapter_version"] == 1
        lost = second.status(running.job_id)
        assert lost["state"] == "failed" and "trainer process stopped" in lost["error"]
        assert second.cancel(running.job_id)["state"] == "failed"
        assert {j["job_id"] for j in second.list_jobs()} == {done.job_id, running.job_id}
        assert second.store.current_version("fact") == 1  # the lost job wrote nothing
        after = second.submit(sft())
        assert wait(second, after.job_id)["adapter_version"] == 2
    finally:
        second.stop()
