"""ServingNode: one device's engine, the adapters it serves and the trainer beside it.

The same object runs in the KilnEngine Serve replica (actors/engine_actor.py, with a remote
trainer) and in process (kiln_ray/api/engine_client.py, with a local one), so the logic below
is tested without Ray:

    which adapter a request uses   its `adapter` (name[@version]), a composition of several
                                   (built once, cached in a slot), the server's default adapter
                                   (set by a job with `activate`), or the base model
    keeping adapters resident      current versions are loaded from the store at start and on
                                   demand (the store is read-only here: the trainer writes it)
    publications                   each new version the trainer writes is hot-swapped in
    metrics                        the engine's figures and the trainer's, for the ingress's
                                   /metrics text
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from kiln_ray.adapters.archive import export_tar
from kiln_ray.adapters.store import AdapterNotFound, AdapterStore, AdapterVersion
from kiln_ray.engine.adapter_manager import AdapterNotLoaded, AdapterSlotsFull
from kiln_ray.engine.async_engine import AsyncLLMEngine, GenerateRequest, OutputSink
from kiln_ray.engine.own_thread import in_own_thread
from kiln_ray.engine.request import RequestOutput
from kiln_ray.engine_metrics import EngineMetrics
from kiln_ray.model.lora import LoraWeights
from kiln_ray.training.service import Job, Publication

log = logging.getLogger("kiln_ray.node")

SLOT_WAIT_S = 30.0  # how long a load waits for running requests to free a slot


class TrainingBackend(Protocol):
    """The trainer, local or remote; every call is async."""

    async def submit(self, job: Job) -> dict: ...
    async def status(self, job_id: str) -> dict: ...
    async def list_jobs(self) -> list[dict]: ...
    async def queued(self) -> list[dict]: ...
    async def cancel(self, job_id: str) -> dict: ...
    async def rollback(self, name: str, version: int) -> int: ...
    async def delete(self, name: str) -> None: ...
    async def retire(self, name: str) -> None: ...
    async def import_archive(self, name: str, data: bytes, activate: bool) -> int: ...
    async def merge(self, name: str, sources: list[tuple[str, int | None, float]], method: str, density: float) -> int: ...
    async def metric_families(self) -> list: ...


class TrainingDisabled(RuntimeError):
    """This server runs no trainer."""


class TrainerUnavailable(RuntimeError):
    """The trainer process died and is being started again."""


@dataclass(frozen=True)
class AdapterChoice:
    """What a generation request asked for, before it is resolved to a resident slot."""

    name: str | None = None  # an adapter, or None
    version: int | None = None
    compose: tuple[tuple[str, int | None, float], ...] = ()  # (name, version, scale)
    use_default: bool = False  # the request named no model: the default adapter if one is set


class ServingNode:
    def __init__(self, engine: AsyncLLMEngine, store: AdapterStore, state_dir: Path, training: TrainingBackend | None,
                 metrics: EngineMetrics | None = None):
        """`metrics` records the engine's figures; its step figures come from the engine's
        `on_step` hook, so build the engine with `on_step=metrics.on_step` (without `metrics`,
        a fresh EngineMetrics reports no step figures)."""
        self.engine = engine
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.store = store
        self.state_dir = Path(state_dir)
        self.training = training
        self.default_adapter: str | None = None
        self._weights: OrderedDict[tuple[str, int], LoraWeights] = OrderedDict()  # small LRU for compositions
        self._loop: asyncio.AbstractEventLoop | None = None
        # Adapter reads and builds at once: each takes a thread (and, for its torch work, an
        # OpenMP pool beside the step thread's), so a burst of requests for an adapter not
        # yet resident queues here instead of starting one per request.
        self._builds = asyncio.Semaphore(2)
        # Loads in flight, by (name, version asked for): a burst of requests for one adapter
        # that is not resident waits for ONE read and build of it.
        self._loading: dict[tuple[str, int | None], asyncio.Future] = {}

    async def start(self) -> None:
        """Serve what survived a restart: every stored adapter's current version (as many as
        there are slots) and the default adapter."""
        self._loop = asyncio.get_running_loop()
        self.default_adapter = self._read_default()
        names = self.store.names()
        if self.default_adapter in names:  # the default first, so it is surely resident
            names.remove(self.default_adapter)
            names.insert(0, self.default_adapter)
        for name in names[: self.engine.engine.config.max_loras]:
            try:
                await self._ensure_resident(name, None)
            except Exception as error:  # noqa: BLE001 - one bad adapter must not stop the server
                log.warning("could not load adapter %s at start: %s", name, error)
        log.info("serving %d stored adapters; default adapter: %s", len(self.store.names()), self.default_adapter)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, choice: AdapterChoice) -> AsyncIterator[list[RequestOutput]]:
        request = await self._resolve(request, choice)
        for attempt in range(2):
            try:
                async for batch in self.engine.generate(request):
                    yield batch
                return
            except AdapterNotLoaded:
                if attempt or request.adapter is None:  # evicted between the check and the add
                    raise
                await self._ensure_resident(request.adapter, request.adapter_version)

    async def submit(self, request: GenerateRequest, choice: AdapterChoice, sink: OutputSink) -> None:
        """Admit the request with its outputs going to `sink` (AsyncLLMEngine.add); raises a
        refusal (bad input, a full engine, an unknown adapter) instead."""
        request = await self._resolve(request, choice)
        try:
            await self.engine.add(request, sink)
        except AdapterNotLoaded:
            if request.adapter is None:
                raise
            await self._ensure_resident(request.adapter, request.adapter_version)  # evicted meanwhile
            await self.engine.add(request, sink)

    async def _resolve(self, request: GenerateRequest, choice: AdapterChoice) -> GenerateRequest:
        if choice.compose:
            name = await self._ensure_composition(choice.compose)
            return replace(request, adapter=name, adapter_version=None)
        name, version = choice.name, choice.version
        if name is None and choice.use_default:
            name = self.default_adapter
        if name is None:
            return request
        await self._ensure_resident(name, version)
        return replace(request, adapter=name, adapter_version=version)

    async def _ensure_resident(self, name: str, version: int | None) -> None:
        manager = self.engine.engine.adapters
        if version is None and name in manager.current or version is not None and manager.is_resident(name, version):
            return
        key = (name, version)
        load = self._loading.get(key)
        if load is None:
            load = self._loading[key] = asyncio.ensure_future(self._load_resident(name, version))
            load.add_done_callback(lambda done: self._loading.pop(key, None) if self._loading.get(key) is done else None)
            load.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved even if nobody waits
        await asyncio.shield(load)  # a waiter that gives up (client gone) leaves the load to the others

    async def _load_resident(self, name: str, version: int | None) -> None:
        stored, weights = await self._build(self._load_weights, name, version)  # AdapterNotFound
        make_current = stored.version == self.store.current_version(name)
        await self._install(name, stored.version, weights, make_current)

    async def _ensure_composition(self, parts: tuple[tuple[str, int | None, float], ...]) -> str:
        resolved = []
        for name, version, scale in parts:
            v = version if version is not None else self.store.current_version(name)
            resolved.append((name, v, float(scale)))
        key = hashlib.blake2b(json.dumps(resolved).encode(), digest_size=8).hexdigest()
        composed_name = f"compose~{key}"  # "~" never appears in a stored adapter's name
        if composed_name in self.engine.engine.adapters.current:
            return composed_name
        weights = [(await self._weights_of(n, v), s) for n, v, s in resolved]
        await self._install(composed_name, 0, await self._build(LoraWeights.compose, weights), True)
        return composed_name

    async def _weights_of(self, name: str, version: int) -> LoraWeights:
        key = (name, version)
        if key not in self._weights:
            _, self._weights[key] = await self._build(self._load_weights, name, version)
            while len(self._weights) > 16:
                self._weights.popitem(last=False)
        return self._weights[key]

    async def _build(self, fn, *args):
        """fn(*args), torch work for an adapter, on a thread of its own (see
        kiln_ray/engine/own_thread.py), two at a time."""
        async with self._builds:
            return await in_own_thread(fn, *args)

    def _load_weights(self, name: str, version: int | None) -> tuple[AdapterVersion, LoraWeights]:
        """Read a version from the store and build its weights (through `_build`)."""
        stored = self.store.load_version(name, version)
        return stored, LoraWeights.from_peft(stored.tensors, stored.config)

    async def _install(self, name: str, version: int, weights: LoraWeights, make_current: bool) -> None:
        """Copy into a free slot beside the running steps, then flip between two steps (the
        hot swap); waits (bounded) while every slot is pinned."""
        deadline = asyncio.get_running_loop().time() + SLOT_WAIT_S
        while True:
            try:
                await self.engine.load_adapter(name, version, weights, make_current)
                return
            except AdapterSlotsFull:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    # -- publications and administration -------------------------------------------------------

    async def apply(self, publication: Publication, received: float | None = None) -> None:
        """Serve a version the trainer just wrote (the hot swap), or stop serving a name.
        `received`: when the publication arrived (time.perf_counter(); default: now), the
        start of its kiln_adapter_swap_seconds."""
        received = time.perf_counter() if received is None else received
        adapters = self.engine.engine.adapters
        if publication.retire:
            versions = await self._unload_here(publication.name)
            self.metrics.on_publication(adapters, None)
            log.info("stopped serving %s%s", publication.name, f" (versions {versions})" if versions else "")
            return
        await self._install(publication.name, publication.version, publication.weights, publication.make_current)
        self.metrics.on_publication(adapters, time.perf_counter() - received)
        if publication.activate:
            self.set_default(publication.name)
        log.info("now serving %s@%d%s", publication.name, publication.version,
                 " (default adapter)" if publication.activate else "")

    def apply_threadsafe(self, publication: Publication, timeout: float = 120.0) -> None:
        """`apply` from another thread (a local trainer's worker), waiting until it is served."""
        asyncio.run_coroutine_threadsafe(self.apply(publication), self._loop).result(timeout)

    def set_default(self, name: str | None) -> None:
        self.default_adapter = name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "default_adapter.json.tmp"
        tmp.write_text(json.dumps({"default_adapter": name}))
        os.replace(tmp, self.state_dir / "default_adapter.json")

    def _read_default(self) -> str | None:
        path = self.state_dir / "default_adapter.json"
        try:
            name = json.loads(path.read_text()).get("default_adapter")
        except (OSError, ValueError):
            return None
        return name if name and self.store.exists(name) else None

    async def load(self, name: str, version: int | None) -> dict:
        await self._ensure_resident(name, version)
        return self.describe(name)

    async def unload(self, name: str) -> list[int]:
        """Stop serving `name` here and, through the trainer, on every other engine replica.
        Returns the versions this replica unloaded."""
        versions = await self._unload_here(name)
        if self.training is not None:
            await self.training.retire(name)
        return versions

    async def _unload_here(self, name: str) -> list[int]:
        if self.default_adapter == name:
            self.set_default(None)
        for key in [k for k in self._weights if k[0] == name]:  # a re-created name@N is new weights
            del self._weights[key]
        return await self.engine.call(lambda e: e.unload_adapter(name))

    async def delete(self, name: str) -> None:
        """Delete from the store; the trainer's retire publication unloads it everywhere."""
        if not self.store.exists(name):
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        await self._unload_here(name)
        await self._training().delete(name)

    def download(self, name: str, version: int | None) -> bytes:
        return export_tar(self.store, name, version)

    def adapters(self) -> list[dict]:
        return [self.describe(name) for name in self.store.names()]

    def describe(self, name: str) -> dict:
        meta = self.store.meta(name)
        resident = [r for r in self.engine.engine.adapters.listing() if r["name"] == name]
        return {
            "name": name,
            "current_version": meta["current_version"],
            "versions": [{"version": v, **info} for v, info in sorted(meta["versions"].items())],
            "resident_versions": [r["version"] for r in resident],
            "serving_version": self.engine.engine.adapters.current.get(name),
            "default": self.default_adapter == name,
        }

    def lora_shape(self, name: str) -> dict | None:
        """`{"version", "r", "lora_alpha"}` of `name`'s current version in the store (what a job
        continuing it keeps), or None if the store has no adapter of that name."""
        try:
            version = self.store.current_version(name)
            config = self.store.version_config(name, version)
        except AdapterNotFound:
            return None
        return {"version": version, "r": config["r"], "lora_alpha": config["lora_alpha"]}

    def adapter_listing(self) -> dict:
        return {"adapters": self.adapters(), "default_adapter": self.default_adapter}

    async def metric_families(self) -> list:
        """The engine's and the trainer's kiln_* figures (prometheus-client families), for
        the ingress to render; without a reachable trainer, the engine's alone."""
        families = self.metrics.families(self.engine.stats(), self.engine.engine.adapters)
        if self.training is not None:
            try:
                families += await self.training.metric_families()
            except TrainerUnavailable:
                pass
        return families

    # -- training (the trainer does the work; publications come back through `apply`) --------

    async def train_submit(self, job: Job) -> dict:
        return await self._training().submit(job)

    async def train_status(self, job_id: str) -> dict:
        return await self._training().status(job_id)

    async def train_jobs(self) -> list[dict]:
        return await self._training().list_jobs()

    async def train_queue(self) -> list[dict]:
        return await self._training().queued()

    async def train_cancel(self, job_id: str) -> dict:
        return await self._training().cancel(job_id)

    async def train_rollback(self, name: str, version: int) -> int:
        return await self._training().rollback(name, version)

    async def train_import(self, name: str, data: bytes, activate: bool) -> int:
        return await self._training().import_archive(name, data, activate)

    async def train_merge(self, name: str, sources: list, method: str, density: float) -> int:
        return await self._training().merge(name, sources, method, density)

    def _training(self) -> TrainingBackend:
        if self.training is None:
            raise TrainingDisabled("training is disabled on this server")
        return self.training


class LocalTraining:
    """A TrainingService in this process as a TrainingBackend."""

    def __init__(self, service):
        self.service = service

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
        return await in_own_thread(self.service.rollback, name, version)

    async def delete(self, name: str) -> None:
        await in_own_thread(self.service.delete, name)

    async def retire(self, name: str) -> None:
        await in_own_thread(self.service.retire, name)

    async def import_archive(self, name: str, data: bytes, activate: bool) -> int:
        return await in_own_thread(self.service.import_archive, name, data, activate)

    async def merge(self, name: str, sources: list[tuple[str, int | None, float]], method: str, density: float) -> int:
        return await in_own_thread(self.service.merge, name, sources, method, density)

    async def metric_families(self) -> list:
        return self.service.metrics.families()
