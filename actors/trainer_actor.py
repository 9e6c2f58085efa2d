"""TrainerActor: the TrainingService in its own process, on the engine's device.

Created by a KilnEngine replica inside the replica's own placement-group bundle (so the
two share one device) with its own CPU/GPU share. The base weights arrive as an ObjectRef of
numpy arrays that Ray maps into this process without a copy (CUDA: IPC handles), so engine
and trainer hold ONE copy of them.

One trainer per application, whatever the number of engine replicas: it is a named actor,
and the first replica to ask creates it in its own bundle (the leader); the others find it by
name. Each adapter version the trainer writes is `ray.put` once as numpy arrays; every engine
replica long-polls `next_publications` (as a consumer with its replica id), swaps the version
in and acknowledges it. A publication returns once every live consumer has acknowledged it,
so a completed job is served by every replica. A replica that stops polling for
CONSUMER_TTL_S is no longer waited for; a new one loads current versions from the store.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time

import ray
import ray.util.metrics as ray_util_metrics
import torch
from ray.util.placement_group import get_current_placement_group

from kernels.dispatch import select_kernels
from kiln_ray.adapters.store import AdapterStore
from kiln_ray import logs
from kiln_ray.config import KilnConfig
from kiln_ray.metrics import Metrics
from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.loader import load_model, read_model_config
from kiln_ray.model.registry import served_model_name
from kiln_ray.model.shared_weights import attach_cuda_handles, attach_weights
from kiln_ray.procinfo import process_memory
from kiln_ray.training.service import Job, Publication, TrainingService
from kiln_ray.training.trainer import Trainer

log = logging.getLogger("kiln_ray.trainer")

ACK_TIMEOUT_S = 120.0
CONSUMER_TTL_S = 30.0  # a consumer polls at least every 10 s (the long-poll timeout)


@ray.remote
class TrainerActor:
    def __init__(self, config: dict, weights: dict | None):
        self.memory_at_start = process_memory(os.getpid())
        cfg = KilnConfig.model_validate(config)
        logs.configure()
        torch.set_num_threads(cfg.training.num_threads)
        torch.set_flush_denormal(True)
        dtype, device = cfg.torch_dtype(), cfg.torch_device()
        if weights is None:  # no shared copy offered: load our own
            model = load_model(cfg.model, dtype, device, select_kernels(device, "auto", dtype))
            self.shared_bytes = 0
        elif device.type == "cuda":  # CUDA IPC handles of the engine's weights, on the same GPU
            with torch.device(device):
                model = CausalLM(read_model_config(cfg.model), select_kernels(device, "auto", dtype), dtype)
            self.shared_bytes = attach_cuda_handles(model, weights)
            torch.cuda.empty_cache()  # give back the placeholders the model was built with
        else:
            model = CausalLM(read_model_config(cfg.model), select_kernels(device, "auto", dtype), dtype)
            self.shared_bytes = attach_weights(model, weights)  # zero-copy views of the engine's weights
        with torch.no_grad():  # read every weight once: had they been copied, this is where it would show
            for p in model.parameters():
                p.float().sum()
        self.memory_after_touch = process_memory(os.getpid())
        self._publications: list[dict] = []
        self._consumers: dict[str, tuple[int, float]] = {}  # replica -> (acked seq, last heard of)
        self._acked = threading.Condition()
        self.publish_latencies: list[float] = []  # publish -> every replica acknowledged, seconds
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None  # the actor's, known at the first poll
        self._new: asyncio.Event | None = None
        self.service = TrainingService(
            Trainer(model, cfg.training.gradient_checkpointing),
            AdapterStore(cfg.adapter_dir),
            self._publish,
            max_queued_jobs=cfg.training.max_queued_jobs,
            webhook_url=cfg.training.webhook_url,
            base_model_name=served_model_name(cfg),
            journal_dir=cfg.state_dir / "jobs",
            upload_max_bytes=cfg.training.upload_max_bytes,
            max_rank=cfg.engine.max_lora_rank,
            metrics=Metrics("trainer", ray_metrics=ray_util_metrics),  # jobs, loss, tokens/s: to Ray from here
        )
        threading.Thread(target=self._start, args=(cfg.training.warm_up,), daemon=True, name="kiln-trainer-start").start()
        log.info("trainer ready: %.0f MiB of base weights shared with the engine", self.shared_bytes / 2**20)

    def _start(self, warm_up: bool) -> None:
        self.service.start(warm_up)
        self.service.ready.wait()
        self.memory_after_warm_up = process_memory(os.getpid())  # every weight has been read by now

    # -- publications (called from the service's worker thread) --------------------------------

    def _publish(self, publication: Publication) -> None:
        seq = next(self._seq)
        weights = None if publication.weights is None else ray.put(publication.weights.to_arrays())
        entry = {
            "seq": seq, "name": publication.name, "version": publication.version, "weights": weights,
            "make_current": publication.make_current, "activate": publication.activate,
            "job_id": publication.job_id, "retire": publication.retire,
        }
        start = time.monotonic()
        with self._acked:
            self._publications.append(entry)
            waited_for = set(self._live_consumers())
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._new.set)
        with self._acked:
            done = self._acked.wait_for(lambda: all(self._consumers.get(c, (0, 0))[0] >= seq
                                                    for c in waited_for & set(self._live_consumers())),
                                        ACK_TIMEOUT_S)
        latency = time.monotonic() - start
        self.publish_latencies.append(latency)
        what = f"{publication.name} retired" if publication.retire else f"{publication.name}@{publication.version}"
        if done:
            log.info("%s served by %d engine replica(s) after %.0f ms", what, len(waited_for), latency * 1e3)
        else:
            log.warning("%s: not every engine replica acknowledged it within %.0f s", what, ACK_TIMEOUT_S)

    def _live_consumers(self) -> list[str]:
        now = time.monotonic()
        return [c for c, (_, seen) in self._consumers.items() if now - seen < CONSUMER_TTL_S]

    async def next_publications(self, after: int, consumer: str = "engine", timeout: float = 10.0) -> list[dict]:
        """Publications with seq > after; waits up to `timeout` for one (a long poll). Each
        engine replica polls as its own consumer."""
        if self._loop is None:
            self._loop, self._new = asyncio.get_running_loop(), asyncio.Event()
        deadline = self._loop.time() + timeout
        while True:
            with self._acked:
                acked, _ = self._consumers.get(consumer, (after, 0.0))
                self._consumers[consumer] = (max(acked, after), time.monotonic())
                ready = [p for p in self._publications if p["seq"] > after]
            if ready or self._loop.time() >= deadline:
                return ready
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), max(0.0, deadline - self._loop.time()))
            except asyncio.TimeoutError:
                pass

    def ack(self, seq: int, consumer: str = "engine") -> None:
        with self._acked:
            acked, _ = self._consumers.get(consumer, (0, 0.0))
            self._consumers[consumer] = (max(acked, seq), time.monotonic())
            live = self._live_consumers()
            oldest = min((self._consumers[c][0] for c in live), default=seq)
            self._publications = [p for p in self._publications if p["seq"] > oldest]
            self._acked.notify_all()

    def publication_stats(self) -> dict:
        """Engine replicas polling this trainer (their last acknowledged publication) and how
        long publications took to reach all of them."""
        with self._acked:
            live = set(self._live_consumers())
            consumers = {c: {"acked": a, "live": c in live} for c, (a, _) in self._consumers.items()}
        ms = sorted(x * 1e3 for x in self.publish_latencies)
        return {"consumers": consumers, "publications": len(ms),
                "publish_to_all_ms_last": round(self.publish_latencies[-1] * 1e3, 1) if ms else None,
                "publish_to_all_ms_p50": round(ms[len(ms) // 2], 1) if ms else None}

    # -- the TrainingBackend calls -------------------------------------------------------------

    async def submit(self, job: Job) -> dict:
        return self.service.submit(job).status()

    async def status(self, job_id: str) -> dict:
        return self.service.status(job_id)

    async def list_jobs(self) -> list[dict]:
        return self.service.list_jobs()

    async def queued(self) -> list[dict]:
        return self.service.queued()

    async def cancel(self, job_id: str) -> dict:
        return self.service.cancel(job_id)

    async def rollback(self, name: str, version: int) -> int:
        return await asyncio.to_thread(self.service.rollback, name, version)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.service.delete, name)

    async def retire(self, name: str) -> None:
        await asyncio.to_thread(self.service.retire, name)

    async def import_archive(self, name: str, data: bytes, activate: bool) -> int:
        return await asyncio.to_thread(self.service.import_archive, name, data, activate)

    async def merge(self, name: str, sources: list, method: str, density: float) -> int:
        return await asyncio.to_thread(self.service.merge, name, sources, method, density)

    async def metric_families(self) -> list:
        return self.service.metrics.families()

    def placement(self) -> dict:
        """Where Ray put this actor: its placement group and node (the engine's, by design)."""
        pg = get_current_placement_group()
        return {"placement_group": pg.id.hex() if pg else None, "node_id": ray.get_runtime_context().get_node_id()}

    def memory(self) -> dict:
        """This process's memory now, at start, after reading every base weight once (its
        private memory, USS, grows by far less than the weights' size: they are the engine's
        shared buffers) and after the warm-up step (LoRA parameters, AdamW state, scratch)."""
        return {"now": process_memory(os.getpid()), "at_start": self.memory_at_start,
                "after_touching_weights": self.memory_after_touch,
                "after_warm_up": getattr(self, "memory_after_warm_up", None), "shared_weight_bytes": self.shared_bytes}
