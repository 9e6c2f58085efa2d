"""KilnEngineRouter: Serve's request router for the KilnEngine deployment, run by every
caller of its handle (the ingress replicas).

A call that names `replica=<id>` (an ingress's subscription to that replica, or an abort of
a request running there) goes to that replica and no other; every other call (a new
request's submit) goes to the less loaded of two random replicas, as with Serve's default
router. A named replica that is gone matches nothing and the call waits, retrying with
Serve's backoff, until its caller times out.

Matching a chosen replica to a waiting call is the delicate part. Serve's default hands it
to the oldest waiting call (FIFO), which could send a subscription to the wrong replica; its
alternative matches on the internal request id, which the calls one HTTP request makes all
share, so all but one of them would wait forever. Here a replica goes to the oldest waiting
call that may run on it. This overrides a private hook of ray.serve's RequestRouter (the one
its own FIFOMixin overrides): it is covered by the e2e and multinode tests.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _target(pending: PendingRequest) -> str | None:
    return pending.kwargs.get("replica")


class KilnEngineRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        # Without this, Serve retries a call no replica can take in a loop that never sleeps,
        # and that loop starves every other call of this handle.
        pending_request.routing_context.should_backoff = True
        target = _target(pending_request)
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give `replica` to the oldest waiting call that may run there."""
        waiting = self._pending_requests_to_fulfill
        for pending in list(waiting):
            if pending.future.done():
                waiting.remove(pending)
                continue
            target = _target(pending)
            if target is None or target == replica.replica_id.unique_id:
                waiting.remove(pending)
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return
