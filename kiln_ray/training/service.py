"""TrainingService: the job queue around a Trainer, the adapter store's only writer, and the
source of adapter publications. Plain Python (a worker thread); the trainer actor wraps it.

    submit -> queued -> running -> completed | failed | cancelled
                 \\----------------------------------> cancelled (cancel while queued)

A job continues from its adapter's current version (weights + optimizer state) unless it asks
for a fresh start, replays a sample of the adapter's earlier examples, and on success writes
version N+1 to the store (atomically), records its examples beside it, and publishes it:
`publish(Publication)` is how the engine hears about a new version. A finished job (completed,
failed or cancelled) POSTs its status to the webhook if one is configured (webhook.py: short
timeout, no redirects, failures logged, never blocking the queue).
"""

from __future__ import annotations

import enum
import json
import os
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln_ray.adapters.archive import read_tar
from kiln_ray.adapters.merge import merge_adapters
from kiln_ray.adapters.store import AdapterNotFound, AdapterStore, InvalidAdapter, validate_name
from kiln_ray.metrics import Metrics
from kiln_ray.model.lora import DEFAULT_TARGETS, LINEAR_ATTENTION_TARGETS, LoraWeights, check_shapes, lora_sites
from kiln_ray.training.data import GroupBatch, TokenizedExample
from kiln_ray.training.trainer import JobCancelled, StepReport, Trainer, TrainConfig, TrainResult
from kiln_ray.procinfo import release_freed_memory
from kiln_ray.training.webhook import post_status

log = logging.getLogger("kiln_ray.training")


class QueueFull(RuntimeError):
    """The job queue is at its limit; retry later."""


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Publication:
    """A version every engine replica should serve: `make_current` flips the name to it;
    `activate` also makes it the server's default adapter. A `retire` publication (no
    weights) tells every replica to stop serving the name (unload, delete)."""

    name: str
    version: int
    weights: LoraWeights | None
    make_current: bool = True
    activate: bool = False
    job_id: str | None = None
    retire: bool = False

    @classmethod
    def retirement(cls, name: str) -> Publication:
        return cls(name, 0, None, make_current=False, retire=True)


@dataclass
class Job:
    job_type: str  # "sft" | "grpo"
    adapter: str
    config: TrainConfig
    activate: bool = False
    examples: list[TokenizedExample] = field(default_factory=list)
    raw_examples: list[dict] = field(default_factory=list)  # as submitted, kept for replay
    groups: list[GroupBatch] = field(default_factory=list)
    webhook_url: str | None = None
    job_id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:16]}")
    state: JobState = JobState.QUEUED
    steps_done: int = 0
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # summed step times, and the tokens those steps processed
    train_tokens: int = 0
    adapter_version: int | None = None
    stopped_early: bool = False  # the job's loss fell below early_stop_loss before its last step
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False

    def status(self) -> dict:
        progress = 1.0 if self.state == JobState.COMPLETED else (self.steps_done / self.total_steps if self.total_steps else 0.0)
        return {
            "job_id": self.job_id,
            "job_type": self.job_type,
            "state": self.state.value,
            "progress": round(progress, 4),
            "current_loss": self.losses[-1] if self.losses else None,
            "losses": list(self.losses),
            "tokens_per_second": round(self.train_tokens / self.train_seconds, 1) if self.train_seconds else None,
            "train_seconds": round(self.train_seconds, 3),
            "adapter": self.adapter,
            "adapter_version": self.adapter_version,
            "stopped_early": self.stopped_early,
            "error": self.error,
            "notes": list(self.notes),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class TrainingService:
    def __init__(
        self,
        trainer: Trainer,
        store: AdapterStore,
        publish: Callable[[Publication], None],
        max_queued_jobs: int = 16,
        webhook_url: str | None = None,
        base_model_name: str = "",
        keep_finished_jobs: int = 200,
        journal_dir: Path | None = None,
        upload_max_bytes: int = 256 << 20,
        metrics: Metrics | None = None,
        webhook_timeout_s: float = 5.0,
        max_rank: int | None = None,
    ):
        """`metrics`: where the training figures are recorded (jobs finished, the running
        job's loss and tokens/s); default: a recorder of this service's own (no Ray).
        `max_rank`: the largest LoRA rank the engine's slots hold (engine.max_lora_rank); an
        upload or merge above it is refused before anything is stored."""
        self.trainer = trainer
        self.store = store
        self.publish = publish
        self.max_queued_jobs = max_queued_jobs
        self.webhook_url = webhook_url
        self.webhook_timeout_s = webhook_timeout_s  # connect, read and write, each
        self.base_model_name = base_model_name
        self.keep_finished_jobs = keep_finished_jobs
        self.upload_max_bytes = upload_max_bytes  # an archive, and separately what it expands to
        self.max_rank = max_rank
        self.metrics = metrics if metrics is not None else Metrics("trainer")
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="kiln-trainer", daemon=True)
        self.ready = threading.Event()  # set once the worker takes jobs (after the warm-up, if any)
        self._warm_up = False
        self.warm_up_seconds: float | None = None
        self.journal = JobJournal(journal_dir, keep_finished_jobs) if journal_dir is not None else None
        # Jobs of earlier trainer processes; a job that was queued or running when its process
        # died is failed, with the reason, so its client learns what happened.
        self.history: OrderedDict[str, dict] = self.journal.recover() if self.journal else OrderedDict()

    def start(self, warm_up: bool = False) -> None:
        """Start the worker; with `warm_up`, it first runs the trainer's throwaway step (the
        first backward's one-time costs), so the first job does not pay them. Jobs submitted
        meanwhile wait in the queue."""
        self._warm_up = warm_up
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._worker.join(timeout)

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        validate_name(job.adapter)
        with self._lock:
            queued = sum(1 for j in self.jobs.values() if j.state == JobState.QUEUED)
            if queued >= self.max_queued_jobs:
                raise QueueFull(f"{queued} jobs are queued (limit {self.max_queued_jobs})")
            self.jobs[job.job_id] = job
            self._forget_old_jobs()
        self._record(job)
        self._queue.put(job)
        log.info("%s queued: %s on adapter %r", job.job_id, job.job_type, job.adapter)
        return job

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued job at once, or a running one at its next step."""
        if job_id in self.history:  # an earlier process's job: long finished
            return dict(self.history[job_id])
        job = self._job(job_id)
        with self._lock:
            if job.state == JobState.QUEUED:
                self._finish(job, JobState.CANCELLED)
            elif job.state == JobState.RUNNING:
                job.cancel_requested = True
        return job.status()

    def status(self, job_id: str) -> dict:
        if job_id in self.history:
            return dict(self.history[job_id])
        return self._job(job_id).status()

    def list_jobs(self) -> list[dict]:
        return [*(dict(h) for h in self.history.values()), *(j.status() for j in self.jobs.values())]

    def queued(self) -> list[dict]:
        return [j.status() for j in self.jobs.values() if j.state in (JobState.QUEUED, JobState.RUNNING)]

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no training job {job_id!r}")
        return job

    def _forget_old_jobs(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        for job in finished[: max(0, len(finished) - self.keep_finished_jobs)]:
            del self.jobs[job.job_id]

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        if self._warm_up:
            try:
                self.warm_up_seconds = self.trainer.warm_up()
                log.info("trainer warm-up step took %.1f s", self.warm_up_seconds)
            except Exception:  # noqa: BLE001 - jobs still run; the first one pays the costs
                log.exception("the trainer warm-up step failed")
        self.ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != JobState.QUEUED:  # cancelled while queued
                continue
            self._run_job(job)
            release_freed_memory()  # the job's activations and optimizer copies, back to the OS

    def _run_job(self, job: Job) -> None:
        with self._lock:
            job.state, job.started_at = JobState.RUNNING, time.time()
            job.total_steps = job.config.epochs or job.config.steps
        self._record(job)
        log.info("%s running", job.job_id)
        try:
            result = self._train(job)
        except JobCancelled:
            self._finish(job, JobState.CANCELLED)
            return
        except Exception as error:  # noqa: BLE001 - a job failure must not stop the queue
            log.exception("%s failed", job.job_id)
            job.error = f"{type(error).__name__}: {error}"
            self._finish(job, JobState.FAILED)
            return
        job.notes.extend(result.notes)
        if result.stopped_early:
            job.stopped_early = True
            job.notes.append(f"stopped early at step {result.steps} of {job.total_steps}: the loss on the job's "
                             f"examples fell below early_stop_loss {job.config.early_stop_loss}")
        try:
            if result.steps:
                job.adapter_version = self._save(job, result)
            elif job.job_type == "grpo":
                job.notes.append("no group had differing rewards: nothing was trained, no new version")
        except Exception as error:  # noqa: BLE001 - e.g. a full disk: the old version stays current
            log.exception("%s could not save its adapter", job.job_id)
            job.error = f"saving the adapter failed: {error}"
            self._finish(job, JobState.FAILED)
            return
        self._finish(job, JobState.COMPLETED)

    def _train(self, job: Job) -> TrainResult:
        start, optimizer_state = None, None
        if not job.config.from_scratch and self.store.exists(job.adapter):
            current = self.store.load_version(job.adapter)
            start, optimizer_state = LoraWeights.from_peft(current.tensors, current.config), current.optimizer_state
        hooks = dict(on_step=lambda r: self._on_step(job, r), should_stop=lambda: job.cancel_requested,
                     on_publish=lambda w, step: self._publish_intermediate(job, w, step))
        if job.job_type == "sft":
            replay = [] if job.config.replay_per_step == 0 else self._replay_pool(job.adapter)
            return self.trainer.run_sft(job.examples, job.config, start, optimizer_state, replay, **hooks)
        return self.trainer.run_grpo(job.groups, job.config, start, optimizer_state, **hooks)

    def _replay_pool(self, name: str) -> list[TokenizedExample]:
        if not self.store.exists(name):
            return []
        return [TokenizedExample(e["input_ids"], e["loss_mask"]) for e in self.store.load_examples(name) if "input_ids" in e]

    def _on_step(self, job: Job, report: StepReport) -> None:
        job.steps_done = report.step
        job.total_steps = report.total_steps
        job.losses.append(round(report.loss, 6))
        job.train_seconds += report.seconds
        job.train_tokens += report.tokens
        self.metrics.set("kiln_training_loss", report.loss, adapter=job.adapter)
        self.metrics.set("kiln_training_tokens_per_second", job.train_tokens / job.train_seconds if job.train_seconds else 0,
                         adapter=job.adapter)

    def _publish_intermediate(self, job: Job, weights: LoraWeights, step: int) -> None:
        tensors, config = weights.to_peft(self.base_model_name)
        version = self.store.save_version(job.adapter, tensors, config, parent=self._current(job.adapter),
                                          job_id=job.job_id, metrics={"step": step, "loss": job.losses[-1]})
        job.adapter_version = version
        self.publish(Publication(job.adapter, version, weights, job_id=job.job_id))

    def _save(self, job: Job, result: TrainResult) -> int:
        tensors, config = result.weights.to_peft(self.base_model_name)
        parent = self._current(job.adapter)
        metrics = {"final_loss": result.losses[-1] if result.losses else None, "steps": result.steps,
                   "stopped_early": result.stopped_early}
        examples = [  # kept for replay; committed with the version, so a failed save records none
            {"messages": raw.get("messages"), "input_ids": ex.input_ids, "loss_mask": ex.loss_mask, "job_id": job.job_id}
            for raw, ex in zip(job.raw_examples, job.examples)
        ] if job.job_type == "sft" else None
        version = self.store.save_version(job.adapter, tensors, config, parent=parent, job_id=job.job_id,
                                          metrics=metrics, optimizer_state=result.optimizer_state, examples=examples)
        self.publish(Publication(job.adapter, version, result.weights, activate=job.activate, job_id=job.job_id))
        return version

    def _record(self, job: Job) -> None:
        if self.journal is None:
            return
        try:
            self.journal.write(job.status())
        except OSError as error:  # a full disk must not fail the job for its journal line
            log.warning("could not record %s in the job journal: %s", job.job_id, error)

    def _finish(self, job: Job, state: JobState) -> None:
        job.state, job.finished_at = state, time.time()
        self.metrics.inc("kiln_training_jobs_total", job_type=job.job_type, state=state.value)
        self._record(job)
        log.info("%s %s%s", job.job_id, state.value, f": {job.error}" if job.error else "")
        url = job.webhook_url or self.webhook_url
        if url:
            threading.Thread(target=post_status, args=(url, job.status(), self.webhook_timeout_s), daemon=True).start()

    # -- adapter administration (the store's writes) -------------------------------------------

    def publish_stored(self, name: str, version: int | None = None, activate: bool = False) -> int:
        """Serve a version that is already in the store (current by default)."""
        v = self.store.load_version(name, version)
        self.publish(Publication(name, v.version, LoraWeights.from_peft(v.tensors, v.config), activate=activate))
        return v.version

    def rollback(self, name: str, version: int) -> int:
        """Make an existing version current again, in the store and in the engine."""
        self.store.set_current(name, version)
        return self.publish_stored(name, version)

    def delete(self, name: str) -> None:
        if not self.store.exists(name):
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        self.store.delete(name)
        self.publish(Publication.retirement(name))

    def retire(self, name: str) -> None:
        """Stop serving `name` on every engine replica (it stays in the store)."""
        self.publish(Publication.retirement(name))

    def save_and_publish(self, name: str, tensors: dict, config: dict, activate: bool = False) -> int:
        """Store a new version built elsewhere (a merge) and serve it."""
        self._check_rank(config)
        version = self.store.save_version(name, tensors, config, parent=self._current(name))
        return self.publish_stored(name, version, activate)

    def _check_rank(self, config: dict) -> None:
        if self.max_rank is not None and int(config.get("r", 0)) > self.max_rank:
            raise InvalidAdapter(f"the adapter's rank {config['r']} is above what the engine serves "
                                 f"(engine.max_lora_rank {self.max_rank})")


    def import_archive(self, name: str, data: bytes, activate: bool = False) -> int:
        """A new version from an uploaded tar.gz, made current and served. Everything is checked
        in memory first (size, entries, paths, links, PEFT format, shapes that fit this base
        model): a refused upload writes nothing, and no reader ever sees an unfit version."""
        validate_name(name)
        tensors, config = read_tar(data, max_bytes=self.upload_max_bytes)
        try:
            check_shapes(lora_sites(self.trainer.model, DEFAULT_TARGETS + LINEAR_ATTENTION_TARGETS),
                         LoraWeights.from_peft(tensors, config))
        except ValueError as error:
            raise InvalidAdapter(str(error)) from None
        self._check_rank(config)
        version = self.store.save_version(name, tensors, config)
        return self.publish_stored(name, version, activate)

    def merge(self, name: str, sources: list[tuple[str, int | None, float]], method: str, density: float = 0.5) -> int:
        """A new adapter (or version) from weighted stored adapters: weighted_average | ties | concat."""
        inputs = []
        for source, version, weight in sources:
            v = self.store.load_version(source, version)
            inputs.append((v.tensors, v.config, float(weight)))
        tensors, config = merge_adapters(inputs, method, density)
        return self.save_and_publish(name, tensors, config)

    def _current(self, name: str) -> int | None:
        return self.store.current_version(name) if self.store.exists(name) else None


class JobJournal:
    """Job statuses on disk, one JSON file per job (written atomically at submit, start and
    finish), so jobs outlive the trainer process that ran them."""

    LOST = ("the trainer process stopped during this job (it crashed or was restarted); "
            "the adapter's previous version is unchanged and still served; submit the job again")

    def __init__(self, directory: Path, keep: int):
        self.dir = Path(directory)
        self.keep = keep
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, status: dict) -> None:
        tmp = self.dir / f".{status['job_id']}.json.tmp"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.dir / f"{status['job_id']}.json")

    def recover(self) -> OrderedDict[str, dict]:
        """Every recorded job, oldest first; unfinished ones become failed (and are rewritten)."""
        records = []
        for path in self.dir.glob("job-*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("unreadable job record %s; ignored", path)
        records.sort(key=lambda r: r.get("created_at") or 0)
        for stale in records[: max(0, len(records) - self.keep)]:
            (self.dir / f"{stale['job_id']}.json").unlink(missing_ok=True)
        history = OrderedDict()
        for record in records[-self.keep:] if self.keep else []:
            was = record.get("state")
            if was in (JobState.QUEUED.value, JobState.RUNNING.value):
                record.update(state=JobState.FAILED.value, error=self.LOST, finished_at=time.time())
                log.warning("%s was %s when the trainer stopped: marked failed", record["job_id"], was)
                self.write(record)
            history[record["job_id"]] = record
        return history
