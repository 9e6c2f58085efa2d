"""KilnIngress: the Serve deployment that speaks HTTP. Thin by design: it loads the tokenizer,
connects the routes of kiln_ray/api/routes.py to the engine deployment (requests by plain
calls, outputs over one subscription stream per engine replica), and exports its own metrics
to Ray (the engine and the trainer export theirs) as well as at /metrics."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle

from kiln_ray.api.demux import Link
from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray import logs
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import EngineDeadError, GenerateRequest, RequestStream
from kiln_ray.engine.request import RequestOutput
from kiln_ray.metrics import Metrics
from kiln_ray.model.registry import load_tokenizer, served_model_name
from kiln_ray.node import AdapterChoice

log = logging.getLogger("kiln_ray.api")


class RayEngineClient:
    """EngineClient over the KilnEngine deployment.

    A request is submitted by a plain call (Serve picks the replica); its outputs come back
    over this ingress's one subscription stream to that replica, opened on first use and
    shared by all of its requests there (kiln_ray/api/demux.py): one Ray item per engine
    step rather than one per request per step."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self.streaming = handle.options(stream=True)
        self.subscriber = f"ingress-{uuid.uuid4().hex[:12]}"
        self._streams: dict[str, RequestStream] = {}  # request id -> its outputs, on every link
        self._links: dict[str, Link] = {}  # engine replica id -> its subscription
        self._opening: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()

    async def generate(self, request: GenerateRequest, choice: AdapterChoice) -> AsyncIterator[list[RequestOutput]]:
        request_id = request.request_id
        stream = RequestStream(asyncio.get_running_loop(), request.params.n)
        self._streams[request_id] = stream  # before the submit: outputs may overtake its reply
        replica = link = None
        try:
            try:
                replica = await self.handle.submit.remote(request, choice, self.subscriber)
            except RAY_UNAVAILABLE as error:
                raise EngineDeadError(f"the engine replica is unavailable: {type(error).__name__}") from None
            link = await self._link(replica)
            link.join(request_id)
            while not stream.done or stream.pending:  # outputs may outrun a slow consumer: hand them all out
                yield await stream.next_batch()
        finally:
            self._streams.pop(request_id, None)
            if link is not None:
                link.leave(request_id)
            if replica is not None and not stream.done:  # the consumer left early, or the link broke
                self._abort(request_id, replica)

    async def _link(self, replica: str) -> Link:
        """This ingress's live subscription to `replica`, opened if there is none."""
        link = self._links.get(replica)
        if link is not None and link.alive:
            return link
        opening = self._opening.get(replica)
        if opening is None:
            opening = self._opening[replica] = self._spawn(self._open(replica))
            opening.add_done_callback(lambda _: self._opening.pop(replica, None))
        return await asyncio.shield(opening)

    async def _open(self, replica: str) -> Link:
        link = Link(replica, self._streams, lambda request_id: self._abort(request_id, replica))
        response = self.streaming.subscribe.remote(self.subscriber, replica=replica)
        items = _engine_errors(response)
        try:  # the replica's first item says it is attached; a vanished replica never answers
            await asyncio.wait_for(anext(items), LINK_OPEN_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration):
            response.cancel()
            raise EngineDeadError(f"engine replica {replica} did not answer") from None
        self._links[replica] = link
        self._spawn(link.run(items))
        log.info("subscribed to engine replica %s", replica)
        return link

    def _abort(self, request_id: str, replica: str) -> None:
        async def abort():
            try:
                await asyncio.wait_for(self.handle.abort.remote(request_id, replica=replica), LINK_OPEN_TIMEOUT_S)
            except (*RAY_UNAVAILABLE, TimeoutError):
                pass

        self._spawn(abort())

    def _spawn(self, coroutine) -> asyncio.Task:
        """A task outside the current HTTP request's context: Serve cancels the calls a
        request made when it ends, and a subscription or an abort must outlive it."""
        task = asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def call(self, method: str, *args):
        try:
            return await self.handle.call.remote(method, *args)
        except RAY_UNAVAILABLE as error:
            raise EngineDeadError(f"the engine replica is unavailable: {type(error).__name__}") from None

    async def info(self) -> dict:
        try:
            return await self.handle.info.remote()
        except RAY_UNAVAILABLE as error:
            return {"alive": False, "error": f"the engine replica is unavailable: {type(error).__name__}"}


LINK_OPEN_TIMEOUT_S = 30.0

# A dead or restarting engine replica: the ingress answers 503 and the client may retry.
RAY_UNAVAILABLE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


async def _engine_errors(stream):
    try:
        async for item in stream:
            yield item
    except RAY_UNAVAILABLE as error:
        raise EngineDeadError(f"the engine replica is unavailable: {type(error).__name__}") from None


@serve.deployment(name="KilnIngress")
@serve.ingress()
class KilnIngress:
    async def __init__(self, engine: DeploymentHandle, config: dict):
        cfg = KilnConfig.model_validate(config)
        logs.configure()
        client = RayEngineClient(engine)
        info = await client.info()  # waits for the engine replica to be up
        ctx = ServerContext(
            config=cfg,
            engine=client,
            tokenizer=load_tokenizer(cfg.model),
            model_name=served_model_name(cfg),
            max_model_len=info["max_model_len"],
            vocab_size=info["vocab_size"],
            metrics=Metrics("ingress", ray_metrics=serve_metrics),
        )
        self._asgi = create_app(ctx)
        log.info("KilnIngress ready for %s (context %d tokens)", ctx.model_name, ctx.max_model_len)

    def __serve_build_asgi_app__(self):
        return self._asgi
