"""KilnEngine: the Serve deployment that owns one device's engine and its trainer.

Thin by design: it loads the model, puts its weights into the object store once (the
trainer maps the same buffers), starts the engine loop, creates the TrainerActor in its own
placement-group bundle, applies the adapter versions the trainer publishes (the hot swap)
and otherwise forwards to its ServingNode. Serve calls `check_health`; a dead step loop fails
it, so Serve replaces the replica (which reloads every adapter from the store).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import time
from collections.abc import AsyncIterator

import ray
import torch
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.trainer_actor import TrainerActor
from kiln_ray.adapters.store import AdapterStore
from kiln_ray.api.engine_client import call_node, engine_info
from kiln_ray import logs
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine, GenerateRequest
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine.outbox import Outbox
from kiln_ray.engine.own_thread import in_own_thread
from kiln_ray.engine.request import RequestOutput
from kiln_ray.engine_metrics import EngineMetrics
from kiln_ray.model.lora import LoraWeights
from kiln_ray.model.registry import served_model_name
from kiln_ray.model.shared_weights import attach_weights, export_cuda_handles, export_weights
from kiln_ray.node import AdapterChoice, ServingNode, TrainerUnavailable
from kiln_ray.procinfo import process_memory
from kiln_ray.training.service import Job, Publication

log = logging.getLogger("kiln_ray.engine")

HEARTBEAT_S = 5.0  # a subscription yields at least this often, even with nothing to say
OUTBOX_LEASE_S = 60.0
STEP_STALL_S = 300.0  # one step running longer than this is hung (check_health fails)


@serve.deployment(name="KilnEngine")
class KilnEngine:
    async def __init__(self, config: dict):
        cfg = KilnConfig.model_validate(config)
        logs.configure()
        self.config = cfg
        self.model_name = served_model_name(cfg)
        replica = serve.get_replica_context()
        self.app_name = replica.app_name or "default"
        self.replica_id = replica.replica_id.unique_id
        # Torch work off this (event-loop) thread, which lives as long as the replica: an
        # OpenMP pool left on it would slow every step (kiln_ray/engine/own_thread.py).
        engine = await in_own_thread(LLMEngine.from_config, cfg)
        # One copy of the base weights per device, mapped by engine and trainer: in the object
        # store on CPU, CUDA IPC handles on a GPU.
        weights_ref = await in_own_thread(self._share_weights, engine.model) if cfg.training.enabled else None
        metrics = EngineMetrics(ray_metrics=serve_metrics)
        self.engine = AsyncLLMEngine(engine, on_step=metrics.on_step)
        AdapterStore(cfg.adapter_dir)  # make sure the folder exists before a read-only open
        self.node = ServingNode(self.engine, AdapterStore(cfg.adapter_dir, read_only=True), cfg.state_dir, None,
                                metrics)
        self.trainer = None
        self._weights_ref = weights_ref
        if cfg.training.enabled:
            self.trainer = self._start_trainer(cfg, weights_ref)
            self.node.training = RemoteTraining(self.trainer)
            self._poller = asyncio.get_running_loop().create_task(self._apply_publications())
        self._outboxes: dict[str, Outbox] = {}  # subscriber -> outputs on their way to it
        self._expiry = asyncio.get_running_loop().create_task(self._expire_outboxes())
        await self.node.start()
        log.info("KilnEngine ready: %s", engine_info(self.node, self.model_name))

    def _share_weights(self, model) -> ray.ObjectRef:
        """Move the base weights into the object store and serve from those buffers, so this
        process keeps no private copy and the trainer maps the same memory. On CUDA only the
        IPC handles travel; the weights stay in this process's GPU memory."""
        if next(model.parameters()).device.type == "cuda":
            return ray.put(export_cuda_handles(model))
        ref = ray.put(export_weights(model))
        shared = attach_weights(model, ray.get(ref))
        gc.collect()
        log.info("%.0f MiB of base weights now live in the object store", shared / 2**20)
        return ref

    def _start_trainer(self, cfg: KilnConfig, weights_ref: ray.ObjectRef | None):
        """The application's one trainer: created in this replica's bundle if no replica has
        created it yet (this one leads), else the existing one (found by name)."""
        pg = get_current_placement_group()
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0) if pg else None
        _, trainer_gpus = cfg.deploy.gpu_shares(use_gpu=torch.cuda.is_available())
        return TrainerActor.options(
            name=f"KilnTrainer-{self.app_name}",
            get_if_exists=True,
            num_cpus=cfg.deploy.trainer_cpus,
            num_gpus=trainer_gpus,
            scheduling_strategy=strategy,
            # Not the engine's runtime env (which a child would inherit): its own priority.
            runtime_env={"env_vars": {"RAY_worker_niceness": str(cfg.training.niceness)}},
        ).remote(cfg.model_dump(), weights_ref)

    async def _apply_publications(self) -> None:
        """Long-poll the trainer for new versions and hot-swap each in, in order. A trainer
        that dies is started again (its running job is lost; adapters in the store are not)."""
        seen = 0
        while True:
            try:
                batch = await self.trainer.next_publications.remote(seen, self.replica_id)
            except ray.exceptions.RayActorError as error:
                log.error("the trainer died (%s); starting a new one (or finding another replica's)", error)
                await asyncio.sleep(1.0 + random.random())  # replicas do not all race to lead
                self.trainer = self._start_trainer(self.config, self._weights_ref)
                self.node.training = RemoteTraining(self.trainer)
                seen = 0
                continue
            for p in batch:
                try:
                    received = time.perf_counter()
                    weights = None if p["retire"] else LoraWeights.from_arrays(await p["weights"])
                    await self.node.apply(Publication(p["name"], p["version"], weights, p["make_current"],
                                                      p["activate"], p["job_id"], p["retire"]), received)
                except Exception:  # noqa: BLE001 - one bad version must not stop later ones
                    log.exception("could not serve %s@%d", p["name"], p["version"])
                seen = p["seq"]
                self.trainer.ack.remote(seen, self.replica_id)

    # -- what the ingress calls ----------------------------------------------------------------

    async def submit(self, request: GenerateRequest, choice: AdapterChoice, subscriber: str) -> str:
        """Admit a request whose outputs go to `subscriber`'s stream (`subscribe`); returns this
        replica's id, which the subscriber's next calls name. Raises a refusal instead."""
        box = self._outbox(subscriber)
        box.track(request.request_id, request.params.n)
        try:
            await self.node.submit(request, choice, box)
        except BaseException:
            box.untrack(request.request_id)
            raise
        return self.replica_id

    async def subscribe(self, subscriber: str, replica: str | None = None) -> AsyncIterator[list[RequestOutput]]:
        """The one stream that carries every output of `subscriber`'s requests here: an empty
        first item (attached), then per engine step what changed (empty items are heartbeats).
        When it ends (the subscriber is gone), its running requests are aborted. `replica`
        pins the call to this replica (actors/engine_router.py)."""
        box = self._outbox(subscriber)
        box.attached = True
        try:
            yield []
            while True:
                yield await box.next_batch(HEARTBEAT_S)
        finally:
            self._close_outbox(box)

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self.engine.abort(request_id)

    def _outbox(self, subscriber: str) -> Outbox:
        box = self._outboxes.get(subscriber)
        if box is None:
            box = self._outboxes[subscriber] = Outbox(asyncio.get_running_loop(), subscriber)
        return box

    def _close_outbox(self, box: Outbox) -> None:
        if self._outboxes.get(box.subscriber) is box:
            del self._outboxes[box.subscriber]
        for request_id in box.live_requests:
            self.engine.abort(request_id)

    async def _expire_outboxes(self) -> None:
        """Requests submitted for a subscriber that never attached (it died in between) are
        aborted after OUTBOX_LEASE_S, so they cannot hold KV blocks forever."""
        while True:
            await asyncio.sleep(OUTBOX_LEASE_S / 4)
            now = asyncio.get_running_loop().time()
            for box in list(self._outboxes.values()):
                if not box.attached and now - box.created > OUTBOX_LEASE_S:
                    log.warning("subscriber %s never attached; aborting its %d requests", box.subscriber,
                                len(box.live_requests))
                    self._close_outbox(box)

    async def call(self, method: str, *args):
        return await call_node(self.node, method, *args)

    async def info(self) -> dict:
        return {**engine_info(self.node, self.model_name), "replica": self.replica_id,
                "memory": await self.memory(), "placement": await self.placement()}

    async def placement(self) -> dict:
        """This replica's and its trainer's placement group and node: the same, by design."""
        pg = get_current_placement_group()
        out = {"engine": {"placement_group": pg.id.hex() if pg else None, "node_id": ray.get_runtime_context().get_node_id()}}
        if self.trainer is not None:
            try:
                out["trainer"] = await self.trainer.placement.remote()
                out["trainer_leader"] = out["trainer"]["placement_group"] == out["engine"]["placement_group"]
                out["publications"] = await self.trainer.publication_stats.remote()
            except ray.exceptions.RayActorError:
                out["trainer"] = None
        return out

    async def memory(self) -> dict:
        """Memory of this process and of its trainer (the weight-sharing measurement)."""
        out = {"engine": process_memory(os.getpid())}
        if self.trainer is not None:
            try:
                out["trainer"] = await self.trainer.memory.remote()
            except ray.exceptions.RayActorError:
                out["trainer"] = None
        return out

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: a dead step loop, or a hung step."""
        problem = self.engine.health_problem(STEP_STALL_S)
        if problem is not None:
            raise RuntimeError(problem)


class RemoteTraining:
    """The TrainerActor as a TrainingBackend. While the trainer is dead (and being started
    again) its calls fail with TrainerUnavailable: a 503 with Retry-After, not a 500."""

    def __init__(self, actor):
        self.actor = actor

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayActorError:
            raise TrainerUnavailable("the trainer is restarting; retry shortly") from None

    async def submit(self, job: Job) -> dict:
        return await self._call("submit", job)

    async def status(self, job_id: str) -> dict:
        return await self._call("status", job_id)

    async def list_jobs(self) -> list[dict]:
        return await self._call("list_jobs")

    async def queued(self) -> list[dict]:
        return await self._call("queued")

    async def cancel(self, job_id: str) -> dict:
        return await self._call("cancel", job_id)

    async def rollback(self, name: str, version: int) -> int:
        return await self._call("rollback", name, version)

    async def delete(self, name: str) -> None:
        await self._call("delete", name)

    async def retire(self, name: str) -> None:
        await self._call("retire", name)

    async def import_archive(self, name: str, data: bytes, activate: bool) -> int:
        return await self._call("import_archive", name, data, activate)

    async def merge(self, name: str, sources: list, method: str, density: float) -> int:
        return await self._call("merge", name, sources, method, density)

    async def metric_families(self) -> list:
        return await self._call("metric_families")
