"""AsyncLLMEngine: an LLMEngine stepping on its own thread, streamed to asyncio callers.

    thread "kiln-engine-loop"          asyncio side (ingress / actor)
    ------------------------           ------------------------------
    drain commands (add, abort,  <---  generate(): queue "add", await its result
    call)                              load_adapter(): "call" reserve a slot, copy into it
                                       on a worker thread, "call" commit (the flip)
    engine.step()                      ... then await batches of RequestOutput
    hand outputs to each stream  --->  (call_soon_threadsafe; batches coalesce
    sleep while there is no work        while a consumer is slower than the engine)

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

from kiln_ray.engine.engine import EngineStats, LLMEngine
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


class _Stream:
    """Outputs of one request, handed from the loop thread to one asyncio consumer."""

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
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._stop = False
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kiln-engine-loop", daemon=True)
        self._thread.start()

    # -- asyncio side --------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        """Add the request and yield its outputs in batches until every sequence finished.

        Raises what `LLMEngine.add_request` raises (ValueError, EngineFullError) before the
        first batch, and EngineDeadError if the loop has stopped. Leaving the iteration early
        aborts the request.
        """
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, request.params.n)
        added = loop.create_future()
        self._submit(("add", request, stream, added))
        try:
            await added  # a rejected request raises here and was never added
        except asyncio.CancelledError:
            self.abort(request.request_id)  # queued after the add, so it undoes it
            raise
        try:
            while not stream.done:
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
        steps, the tensors are copied into it on a worker thread while steps go on, and
        `name -> slot` flips between two later steps. Requests admitted before the flip run
        on the old version. Raises what LLMEngine.reserve_adapter_slot raises."""
        fill = await self.call(LLMEngine.reserve_adapter_slot, name, version, weights, make_current)
        if fill is None:  # resident already
            return
        loop = asyncio.get_running_loop()
        copy = loop.run_in_executor(None, self.engine.fill_adapter_slot, fill, weights)
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
        try:
            while not self._stop:
                self._wakeup.clear()
                if self._drain_commands():
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(timeout=1.0)
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                elapsed = time.perf_counter() - start
                self._deliver(outputs)
                self._stats = self.engine.stats()
                if self.on_step is not None:
                    self.on_step(self._stats, elapsed)
        except BaseException as error:  # noqa: BLE001 - the loop must report whatever killed it
            log.exception("engine loop stopped")
            self._error = error or RuntimeError("engine loop stopped")
            dead = EngineDeadError(f"the engine loop stopped: {error!r}")
            for stream in self._streams.values():
                _call_soon(stream.loop, stream.fail, dead)
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
                _call_soon(loop, _resolve, done, result, error)
                continue
            if command[0] == "add":
                _, request, stream, added = command
                try:
                    self.engine.add_request(
                        request.request_id, request.prompt_token_ids, request.params,
                        request.adapter, request.adapter_version,
                    )
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    _call_soon(stream.loop, _resolve, added, None, error)
                    continue
                if _call_soon(stream.loop, _resolve, added, None, None):
                    self._streams[request.request_id] = stream
                else:  # the caller's event loop is gone: nobody will read this
                    self.engine.abort(request.request_id)
            else:
                _, request_id = command
                if self.engine.abort(request_id):
                    log.info("request %s aborted", request_id)
                self._streams.pop(request_id, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_request: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is None:  # aborted meanwhile
                continue
            if not _call_soon(stream.loop, stream.put, outs):  # its event loop is gone
                self.engine.abort(request_id)
            if request_id not in self.engine.requests:  # every sequence finished (or aborted)
                del self._streams[request_id]

    def _fail_pending_adds(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _call_soon(command[2].loop, _resolve, command[3], None, error)
            elif command[0] == "call":
                _call_soon(command[3], _resolve, command[4], None, error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Schedule fn(*args) on a consumer's event loop; False if that loop has closed (the loop
    thread must survive any consumer vanishing)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)

