"""AsyncLLMEngine: an LLMEngine stepping on its own thread, streamed to asyncio callers.

    thread "kiln-engine-loop"          asyncio side (ingress / actor)
    ------------------------           ------------------------------
    drain commands (add, abort,  <---  add(request, sink) / generate(): queue "add",
    call)                              await its result, then await batches of outputs;
                                       load_adapter(): "call" reserve a slot, copy into it
                                       on a worker thread, "call" commit (the flip)
    engine.step()
    hand outputs to each sink    --->  (one call_soon_threadsafe per sink and step; batches
    sleep while there is no work        coalesce while a consumer is slower than the engine)

A sink receives the outputs of one request (`generate`'s stream) or of many (an Outbox of
kiln_ray/engine/outbox.py, which carries every request of one ingress replica over a single
stream); either way it gets one `put` per step with all of its requests' increments.

The engine is touched only by the loop thread, except for the copy of a new adapter into a
slot reserved for it, which writes only that slot (LLMEngine.fill_adapter_slot). A caller
that stops iterating (client gone, stop string matched) aborts its request, so its KV blocks
are freed at the next step. If a step raises, the loop stops, every stream fails with the
error, and `is_alive` turns False so a supervisor (Ray Serve's health check) can restart
the process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from kiln_ray.engine.engine import EngineStats, LLMEngine
from kiln_ray.engine.own_thread import in_own_thread, settle
from kiln_ray.engine.request import RequestOutput
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.lora import LoraWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateRequest:
    """What crosses from the ingress to the engine: token ids and sampling parameters only."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # an adapter name: its current version, or `adapter_version`
    adapter_version: int | None = None


class EngineDeadError(RuntimeError):
    """The engine loop has stopped after an internal error; the process should be restarted."""


class OutputSink(Protocol):
    """Where the loop thread hands a request's outputs: both methods run on `loop`."""

    loop: asyncio.AbstractEventLoop

    def put(self, outputs: list[RequestOutput]) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class RequestStream:
    """Outputs of one request for one asyncio consumer: from the loop thread (`generate`), or
    from an ingress's demultiplexer (kiln_ray/api/demux.py). A sink of one request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_sequences: int):
        self.loop = loop
        self.pending: deque[RequestOutput] = deque()
        self.ready = asyncio.Event()
        self.unfinished = num_sequences
        self.error: BaseException | None = None

    def put(self, outputs: list[RequestOutput]) -> None:  # on the event loop
        self.pending.extend(outputs)
        self.unfinished -= sum(1 for o in outputs if o.finished)
        self.ready.set()

    def fail(self, error: BaseException) -> None:  # on the event loop
        self.error = error
        self.ready.set()

    @property
    def done(self) -> bool:
        return self.unfinished <= 0

    async def next_batch(self) -> list[RequestOutput]:
        """The outputs delivered since the last call (waiting for some); once they are all
        handed out, a failure is raised. Outputs and a failure arriving together give the
        outputs first, then the failure, never a wait."""
        if not self.pending and self.error is None:
            await self.ready.wait()
        self.ready.clear()
        if self.pending:
            batch = list(self.pending)
            self.pending.clear()
            return batch
        raise self.error


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[EngineStats, float], None] | None = None):
        """`on_step(stats, step_seconds)` runs on the loop thread after every step (metrics)."""
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, OutputSink] = {}  # request id -> its sink; loop thread only
        self._stop = False
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self._step_started: float | None = None  # monotonic time the running step began
        self._thread = threading.Thread(target=self._run, name="kiln-engine-loop", daemon=True)
        self._thread.start()

    # -- asyncio side --------------------------------------------------------------------------

    async def add(self, request: GenerateRequest, sink: OutputSink) -> None:
        """Admit the request; from the next step on, its outputs go to `sink` (with those of
        the sink's other requests, one `put` per step) until every sequence finished.

        Raises what `LLMEngine.add_request` raises (ValueError, EngineFullError, ...) and
        EngineDeadError if the loop has stopped; a refused request was never added, and a
        cancelled call is undone (aborted).
        """
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        added = asyncio.get_running_loop().create_future()
        self._submit(("add", request, sink, added))
        try:
            await added
        except asyncio.CancelledError:
            self.abort(request.request_id)  # queued after the add, so it undoes it
            raise

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """Add the request and yield its outputs in batches until every sequence finished.

        Raises what `add` raises before the first batch. Leaving the iteration early aborts
        the request.
        """
        stream = RequestStream(asyncio.get_running_loop(), request.params.n)
        await self.add(request, stream)
        try:
            while not stream.done or stream.pending:  # outputs may outrun a slow consumer: hand them all out
                yield await stream.next_batch()
        finally:
            if not stream.done:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, non-blocking); unknown ids are ignored."""
        self._submit(("abort", request_id))

    async def call(self, fn: Callable, *args):
        """Run fn(engine, *args) on the loop thread between two steps and return its result
        (or raise its exception): how the adapter bookkeeping changes without racing a step."""
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._submit(("call", fn, args, loop, done))
        return await done

    async def load_adapter(self, name: str, version: int, weights: LoraWeights, make_current: bool = True) -> None:
        """The hot swap without stalling decoding (DESIGN §3): a slot is reserved between two
        steps, the tensors are copied into it on a thread of their own while steps go on, and
        `name -> slot` flips between two later steps. Requests admitted before the flip run
        on the old version. Raises what LLMEngine.reserve_adapter_slot raises."""
        fill = await self.call(LLMEngine.reserve_adapter_slot, name, version, weights, make_current)
        if fill is None:  # resident already
            return
        loop = asyncio.get_running_loop()
        copy = in_own_thread(self.engine.fill_adapter_slot, fill, weights)  # no lasting OpenMP pool
        try:
            await asyncio.shield(copy)
        except BaseException:
            # A cancelled caller does not stop the worker thread: the slot goes back only
            # once nothing writes it any more.
            copy.add_done_callback(lambda _: self._submit(("call", LLMEngine.abandon_adapter_slot, (fill,), loop,
                                                            loop.create_future())))
            raise
        await self.call(LLMEngine.commit_adapter_slot, fill)

    def stats(self) -> EngineStats:
        """A snapshot taken after the latest step."""
        return self._stats

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def health_problem(self, stall_after_s: float) -> str | None:
        """Why the loop cannot serve (dead, or one step running past `stall_after_s`: hung),
        or None. A step is bounded by the token budget: seconds, not minutes."""
        if not self.is_alive():
            return f"the engine loop is dead: {self._error!r}"
        started = self._step_started
        if started is not None and time.monotonic() - started > stall_after_s:
            return f"one engine step has run for {time.monotonic() - started:.0f} s (more than {stall_after_s:g} s): hung"
        return None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()
        if self._error is not None:  # the loop died meanwhile: fail what it will never process
            self._fail_pending_adds(EngineDeadError(f"the engine loop stopped: {self._error!r}"))

    # -- loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        # Per thread (the CPU's control register), inherited only by threads started later:
        # set here, where the steps and their OpenMP workers run, whichever thread built the
        # engine. Strongly decaying linear-attention heads underflow into slow denormals.
        torch.set_flush_denormal(True)
        try:
            while not self._stop:
                self._wakeup.clear()
                if self._drain_commands():
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(timeout=1.0)
                    continue
                start = time.perf_counter()
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                elapsed = time.perf_counter() - start
                self._deliver(outputs)
                self._stats = self.engine.stats()
                if self.on_step is not None:
                    self.on_step(self._stats, elapsed)
        except BaseException as error:  # noqa: BLE001 - the loop must report whatever killed it
            log.exception("engine loop stopped")
            self._error = error or RuntimeError("engine loop stopped")
            dead = EngineDeadError(f"the engine loop stopped: {error!r}")
            for sink in {id(s): s for s in self._streams.values()}.values():
                _call_soon(sink.loop, sink.fail, dead)
            self._streams.clear()
            self._fail_pending_adds(dead)

    def _drain_commands(self) -> bool:
        """Apply queued adds and aborts; whether there were any."""
        drained = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return drained
            drained = True
            if command[0] == "call":
                _, fn, args, loop, done = command
                try:
                    result, error = fn(self.engine, *args), None
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    result, error = None, exc
                _call_soon(loop, settle, done, result, error)
                continue
            if command[0] == "add":
                _, request, sink, added = command
                try:
                    self.engine.add_request(
                        request.request_id, request.prompt_token_ids, request.params,
                        request.adapter, request.adapter_version,
                    )
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    _call_soon(sink.loop, settle, added, None, error)
                    continue
                if _call_soon(sink.loop, settle, added, None, None):
                    self._streams[request.request_id] = sink
                else:  # the caller's event loop is gone: nobody will read this
                    self.engine.abort(request.request_id)
            else:
                _, request_id = command
                if self.engine.abort(request_id):
                    log.info("request %s aborted", request_id)
                self._streams.pop(request_id, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One `put` per sink with all of its requests' outputs of this step."""
        by_sink: dict[int, tuple[OutputSink, list[RequestOutput]]] = {}
        for out in outputs:
            sink = self._streams.get(out.request_id)
            if sink is not None:  # else aborted meanwhile
                by_sink.setdefault(id(sink), (sink, []))[1].append(out)
        for sink, outs in by_sink.values():
            if not _call_soon(sink.loop, sink.put, outs):  # its event loop is gone
                for request_id in {o.request_id for o in outs}:
                    self.engine.abort(request_id)
        for request_id in {o.request_id for o in outputs}:
            if request_id not in self.engine.requests:  # every sequence finished (or aborted)
                self._streams.pop(request_id, None)

    def _fail_pending_adds(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _call_soon(command[2].loop, settle, command[3], None, error)
            elif command[0] == "call":
                _call_soon(command[3], settle, command[4], None, error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Schedule fn(*args) on a consumer's event loop; False if that loop has closed (the loop
    thread must survive any consumer vanishing)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
