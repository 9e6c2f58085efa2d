"""TrainingService: the job queue, the store's writes, publications and webhooks (no Ray)."""

import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kiln_ray.adapters.store import AdapterStore
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.loader import load_model
from kiln_ray.model.lora import DEFAULT_TARGETS, LoraWeights, TrainableLora, lora_sites
from kiln_ray.training.data import TokenizedExample, pack
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


class WebhookReceiver:
    """A real local HTTP server: /ok records the body (204); /redirect answers 307 to /target;
    /hang records, then holds the request open until `release` is set."""

    def __init__(self):
        self.received: dict[str, list[dict]] = {}
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.setdefault(self.path, []).append(body)
                if self.path == "/hang":
                    receiver.release.wait(60)
                if self.path == "/redirect":
                    self.send_response(307)
                    self.send_header("Location", "/target")
                else:
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self):
        self.release.set()
        self.server.shutdown()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def hooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture()
def warnings_logged():
    """Warnings of the training service (caught on its own logger: kiln_ray.logs may have
    turned off propagation to the root logger)."""
    logger, records = logging.getLogger("kiln_ray.training"), Records()
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


def hooked_service(tiny_model_dirs, tmp_path, url, **kwargs):
    svc = TrainingService(Trainer(load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")),
                          AdapterStore(tmp_path / "a"), lambda p: None, webhook_url=url, **kwargs)
    svc.start()
    return svc


def eventually(condition, timeout=20):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_webhook_posts_the_final_status_of_a_completed_and_of_a_failed_job(tiny_model_dirs, tmp_path, hooks):
    svc = hooked_service(tiny_model_dirs, tmp_path, hooks.url("/ok"))
    try:
        done = svc.submit(sft())
        diverging = svc.submit(sft("fresh", lora_alpha=1e308))  # fails for real: its loss is not finite
        wait(svc, done.job_id)
        assert wait(svc, diverging.job_id)["state"] == "failed"
        eventually(lambda: len(hooks.received.get("/ok", [])) == 2)
    finally:
        svc.stop()
    by_job = {body["job_id"]: body for body in hooks.received["/ok"]}
    assert by_job[done.job_id]["state"] == "completed" and by_job[done.job_id]["adapter_version"] == 1
    failed = by_job[diverging.job_id]
    assert failed["state"] == "failed" and "diverged" in failed["error"] and failed["adapter_version"] is None


def test_webhook_redirects_are_not_followed(tiny_model_dirs, tmp_path, hooks, warnings_logged):
    svc = hooked_service(tiny_model_dirs, tmp_path, hooks.url("/redirect"))
    try:
        job = svc.submit(sft())
        wait(svc, job.job_id)
        eventually(lambda: any("answered 307" in m for m in warnings_logged))
    finally:
        svc.stop()
    assert [b["job_id"] for b in hooks.received["/redirect"]] == [job.job_id]
    assert "/target" not in hooks.received  # the redirect was logged, not followed


def test_a_hanging_webhook_does_not_hold_up_the_next_job(tiny_model_dirs, tmp_path, hooks, warnings_logged):
    svc = hooked_service(tiny_model_dirs, tmp_path, hooks.url("/hang"), webhook_timeout_s=60)
    try:
        first = svc.submit(sft("first"))
        wait(svc, first.job_id)
        eventually(lambda: len(hooks.received.get("/hang", [])) == 1)  # its webhook hangs from now on
        second = svc.submit(sft("second"))
        assert wait(svc, second.job_id, timeout=30)["state"] == "completed"
        assert warnings_logged == [] and not hooks.release.is_set()  # the first one is still hanging
    finally:
        svc.stop()


def test_a_hanging_webhook_gives_up_after_its_short_timeout(tiny_model_dirs, tmp_path, hooks, warnings_logged):
    svc = hooked_service(tiny_model_dirs, tmp_path, hooks.url("/hang"), webhook_timeout_s=0.5)
    try:
        job = svc.submit(sft())
        wait(svc, job.job_id)
        eventually(lambda: any(f"failed for {job.job_id}" in m and "timed out" in m for m in warnings_logged))
        assert not hooks.release.is_set()  # nobody answered: the client gave up by itself
    finally:
        svc.stop()


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


def facts(n=3, seed=0):
    """n fictional facts sharing a 5-token question prefix, each with a 4-token answer."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(5)]
    return [TokenizedExample(prefix + [rng.randrange(3, 256) for _ in range(5)], [False] * 6 + [True] * 4)
            for _ in range(n)]


def answers_all(model, weights, ex) -> bool:
    """Teacher-forced greedy: every answer token is the model's top choice."""
    batch = pack([ex])
    lora = TrainableLora(lora_sites(model, DEFAULT_TARGETS), weights.rank, weights.alpha, init=weights)
    with torch.no_grad():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, ForwardContext.dense(batch.seq_lens, lora=lora)))
    answer = batch.target_mask
    return bool((logits[answer].argmax(-1) == batch.targets[answer]).all())


def test_replay_through_the_store_keeps_earlier_facts(service, monkeypatch):
    """Three facts taught one after another into one adapter through the service: each job's
    examples land in the store's examples.jsonl, and the next job replays them from there
    (one per step), so every fact is still answered. The same jobs without replay forget the
    first two (on this tiny model as on SmolLM2: checked stable over 12 seeds of the facts)."""
    pools = []
    run_sft = service.trainer.run_sft

    def recording(examples, config, start, optimizer_state, replay, **hooks):
        pools.append((config.replay_per_step, [e.input_ids for e in replay]))
        return run_sft(examples, config, start, optimizer_state, replay, **hooks)

    monkeypatch.setattr(service.trainer, "run_sft", recording)
    taught = facts()
    cfg = dict(learning_rate=5e-3, steps=20, replay_per_step=1)
    for fact in taught:
        for adapter, replay in (("replayed", 1), ("plain", 0)):
            job = Job("sft", adapter, TrainConfig(**{**QUICK.__dict__, **cfg, "replay_per_step": replay}),
                      examples=[fact], raw_examples=[{"messages": []}])
            assert wait(service, service.submit(job).job_id)["state"] == "completed"

    ids = [f.input_ids for f in taught]
    assert [e["input_ids"] for e in service.store.load_examples("replayed")] == ids
    assert (service.store.root / "replayed" / "examples.jsonl").is_file()
    assert [p for r, p in pools if r] == [[], ids[:1], ids[:2]]  # read back from the store
    assert [p for r, p in pools if not r] == [[], [], []]
    model = service.trainer.model
    final = {name: LoraWeights.from_peft(*(lambda v: (v.tensors, v.config))(service.store.load_version(name)))
             for name in ("replayed", "plain")}
    assert [answers_all(model, final["replayed"], f) for f in taught] == [True, True, True]
    assert [answers_all(model, final["plain"], f) for f in taught] == [False, False, True]


def test_early_stop_ends_a_job_before_its_step_budget(service):
    job = service.submit(sft(steps=200, early_stop_loss=1.5))
    status = wait(service, job.job_id)
    assert status["state"] == "completed" and status["stopped_early"], status
    losses = status["losses"]
    assert len(losses) < 200 and losses[-1] < 1.5 <= min(losses[:-1])
    assert any("stopped early at step" in n for n in status["notes"])
    assert service.store.meta("fact")["versions"][1]["metrics"]["stopped_early"] is True
    full = wait(service, service.submit(sft("budget", steps=5, early_stop_loss=None)).job_id)
    assert len(full["losses"]) == 5 and not full["stopped_early"]


def test_warm_up_runs_once_at_start_and_leaves_no_trace(tiny_model_dirs, tmp_path):
    """A service started with warm_up runs the trainer's throwaway step once, before its
    first job; it stores and publishes nothing, and the next job is bit-identical to the
    same job on a service that did not warm up (same frozen model, same random stream)."""
    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def run(warm_up):
        published, events = [], []
        trainer = Trainer(model)
        warm = trainer.warm_up
        trainer.warm_up = lambda: events.append("warm-up") or warm()
        svc = TrainingService(trainer, AdapterStore(tmp_path / f"store-{warm_up}"), published.append)
        torch.manual_seed(0)
        svc.start(warm_up=warm_up)
        try:
            assert svc.ready.wait(60)
            assert svc.store.names() == [] and published == []
            for _ in range(2):
                events.append(wait(svc, svc.submit(sft()).job_id)["state"])
        finally:
            svc.stop()
        return events, svc.store.load_version("fact", 1).tensors

    events, warmed = run(warm_up=True)
    assert events == ["warm-up", "completed", "completed"]
    events, cold = run(warm_up=False)
    assert events == ["completed", "completed"]
    assert warmed.keys() == cold.keys() and all(torch.equal(warmed[k], cold[k]) for k in warmed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
