"""KilnEngineRouter: Serve's request router for the KilnEngine deployment, run by every
caller of its handle (the ingress replicas).

A call that names `replica=<id>` (an ingress's subscription to that replica, or an abort of
a request running there) goes to that replica and no other; every other call (a new
request's submit) goes to the less loaded of two random replicas, as Serve's default router
does. Unlike that router, requests are not matched to replicas in FIFO order (FIFO hands a
replica chosen for one request to whichever request waits longest, which would send a
subscription to the wrong replica). A named replica that is gone matches nothing and the
call waits, retrying with Serve's backoff, until its caller times out.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class KilnEngineRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if pending_request is not None:
            # Without this, Serve retries a request no replica can take in a loop that never
            # sleeps, and that loop starves every other request of this handle.
            pending_request.routing_context.should_backoff = True
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
