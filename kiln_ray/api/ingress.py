"""KilnIngress: the Serve deployment that speaks HTTP. Thin by design: it loads the tokenizer,
connects the routes of kiln_ray/api/routes.py to the engine deployment through a streaming
DeploymentHandle, and exports its own metrics to Ray (the engine and the trainer export theirs)
as well as at /metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle

from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray import logs
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import EngineDeadError, GenerateRequest
from kiln_ray.engine.request import RequestOutput
from kiln_ray.metrics import Metrics
from kiln_ray.model.registry import load_tokenizer, served_model_name
from kiln_ray.node import AdapterChoice

log = logging.getLogger("kiln_ray.api")


class RayEngineClient:
    """EngineClient over the KilnEngine deployment."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self.streaming = handle.options(stream=True)

    async def generate(self, request: GenerateRequest, choice: AdapterChoice) -> AsyncIterator[list[RequestOutput]]:
        response = self.streaming.generate.remote(request, choice)
        finished = False
        try:
            async for batch in _engine_errors(response):
                yield batch
            finished = True
        finally:
            if not finished:  # the consumer left early: stop the engine-side generator for sure
                response.cancel()
                try:
                    await self.handle.abort.remote(request.request_id)
                except RAY_UNAVAILABLE:
                    pass

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
