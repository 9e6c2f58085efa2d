"""KilnIngress: the Serve deployment that speaks HTTP. Thin by design: it loads the tokenizer,
connects the routes of kiln_ray/api/routes.py to the engine deployment through a streaming
DeploymentHandle, and exports its metrics to Ray as well as at /metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle

from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray import logs
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import GenerateRequest
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
            async for batch in response:
                yield batch
            finished = True
        finally:
            if not finished:  # the consumer left early: stop the engine-side generator for sure
                response.cancel()
                await self.handle.abort.remote(request.request_id)

    async def call(self, method: str, *args):
        return await self.handle.call.remote(method, *args)

    async def info(self) -> dict:
        return await self.handle.info.remote()


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
            metrics=Metrics(ray_metrics=serve_metrics),
        )
        self._asgi = create_app(ctx)
        log.info("KilnIngress ready for %s (context %d tokens)", ctx.model_name, ctx.max_model_len)

    def __serve_build_asgi_app__(self):
        return self._asgi
