"""The ingress side of an engine subscription: one stream per engine replica carries every
output of this ingress's requests there (kiln_ray/engine/outbox.py); `Link` hands each
step's outputs to the streams of the requests they belong to.

    engine replica R --subscription: [outputs of step k for many requests]--> Link(R)
                                                                 |
                      RequestStream(r1) <-- put(r1's outputs) ---+--> RequestStream(r2) ...

A request's stream exists (in the shared `streams` map) before the request is submitted,
so outputs that overtake the submit's reply still find it; it joins its link's `members`
once the reply names the replica. When the subscription ends or fails, every member fails
with EngineDeadError (the replica is gone: its requests are lost, a retry goes elsewhere).
Plain asyncio: no Ray here (api/ingress.py opens the subscriptions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from kiln_ray.engine.async_engine import EngineDeadError, RequestStream
from kiln_ray.engine.request import RequestOutput

log = logging.getLogger("kiln_ray.api")


class Link:
    def __init__(self, replica: str, streams: dict[str, RequestStream], abort: Callable[[str], None]):
        """`streams`: every request stream of this ingress, by request id (shared by its
        links); `abort(request_id)`: stop a request on this replica that nobody reads."""
        self.replica = replica
        self.streams = streams
        self.abort = abort
        self.members: set[str] = set()
        self.error: BaseException | None = None  # set once the subscription has ended
        self._aborted: set[str] = set()

    @property
    def alive(self) -> bool:
        return self.error is None

    def join(self, request_id: str) -> None:
        """The request runs on this link's replica; raises if the link has ended already."""
        if self.error is not None:
            raise self.error
        self.members.add(request_id)

    def leave(self, request_id: str) -> None:
        self.members.discard(request_id)

    async def run(self, batches: AsyncIterator[list[RequestOutput]]) -> None:
        """Consume the subscription until it ends; then fail every member."""
        try:
            async for batch in batches:
                self.deliver(batch)
            error: BaseException = EngineDeadError(f"engine replica {self.replica} closed its stream")
        except asyncio.CancelledError:
            error = EngineDeadError("the ingress is shutting down")
            raise
        except Exception as failure:  # noqa: BLE001 - handed to every member
            log.warning("the stream from engine replica %s failed: %s", self.replica, failure)
            error = failure if isinstance(failure, EngineDeadError) else EngineDeadError(
                f"engine replica {self.replica} is unavailable: {type(failure).__name__}")
        finally:
            self.error = error
            for request_id in list(self.members):
                stream = self.streams.get(request_id)
                if stream is not None:
                    stream.fail(error)
            self.members.clear()

    def deliver(self, batch: list[RequestOutput]) -> None:
        by_request: dict[str, list[RequestOutput]] = {}
        for out in batch:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            stream = self.streams.get(request_id)
            if stream is not None:
                stream.put(outs)
            elif request_id not in self._aborted and not all(o.finished for o in outs):
                self._aborted.add(request_id)  # its reader left: stop it, once
                self.abort(request_id)
        if len(self._aborted) > 4096:
            self._aborted.clear()
