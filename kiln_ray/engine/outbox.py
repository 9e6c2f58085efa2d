"""Outbox: every output of one subscriber's requests, gathered for a single stream.

An ingress replica subscribes once to each engine replica and receives, per engine step, one
item holding the increments of all of its requests there, instead of one stream item per
request per step (each item through Ray costs far more than the few token ids it carries).

    loop thread --put(outputs of step k)--> Outbox --next_batch()--> subscription stream
                                             (batches coalesce while the reader is slower)

The outbox also remembers which of its requests are still running, so that when its
subscription ends (the ingress is gone) the engine can abort them.
"""

from __future__ import annotations

import asyncio

from kiln_ray.engine.request import RequestOutput


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, subscriber: str):
        self.loop = loop
        self.subscriber = subscriber
        self.created = loop.time()
        self.attached = False  # a subscription reads it (set by the reader)
        self._pending: list[RequestOutput] = []
        self._ready = asyncio.Event()
        self._error: BaseException | None = None
        self._live: dict[str, int] = {}  # request id -> its unfinished sequences

    def track(self, request_id: str, num_sequences: int) -> None:
        """Count `request_id` as running until its sequences finish; call before adding it."""
        self._live[request_id] = num_sequences

    def untrack(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    @property
    def live_requests(self) -> list[str]:
        return list(self._live)

    def put(self, outputs: list[RequestOutput]) -> None:  # on the event loop
        self._pending.extend(outputs)
        for out in outputs:
            if out.finished and out.request_id in self._live:
                self._live[out.request_id] -= 1
                if self._live[out.request_id] <= 0:
                    del self._live[out.request_id]
        self._ready.set()

    def fail(self, error: BaseException) -> None:  # on the event loop
        self._error = error
        self._ready.set()

    async def next_batch(self, timeout: float) -> list[RequestOutput]:
        """Everything delivered since the last call, waiting up to `timeout` s for something
        (then [], a heartbeat). Once the outputs before a failure are handed out, the failure
        is raised."""
        if not self._pending and self._error is None:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        self._ready.clear()
        if self._pending:
            batch, self._pending = self._pending, []
            return batch
        if self._error is not None:
            raise self._error
        return []
