"""Training and adapter routes (Kiln-compatible names and shapes, extended).

    POST   /v1/train/sft                 {adapter, examples: [{messages}], config} -> {job_id, state, adapter}
    POST   /v1/train/grpo                {adapter, groups: [{messages, completions: [{text, reward}]}], config}
    GET    /v1/train/status[/{job_id}]   job status (state, progress, losses, adapter_version, ...)
    GET    /v1/train/queue               queued and running jobs
    DELETE /v1/train/queue/{job_id}      cancel a queued or running job
    GET    /v1/adapters                  stored adapters, their versions, what is served
    POST   /v1/adapters/load | unload    make an adapter (version) resident / stop serving it
    DELETE /v1/adapters/{name}           unload and delete from the store
    POST   /v1/adapters/{name}/rollback  serve an earlier version again
    POST   /v1/adapters/upload           multipart: file (PEFT tar.gz), name, activate
    GET    /v1/adapters/{name}/download  tar.gz of a version (PEFT format)
    POST   /v1/adapters/merge            weighted_average | ties | concat into a new adapter

The ingress tokenizes training data and builds the loss masks here; the trainer only sees
token ids.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from kiln_ray.adapters.store import InvalidAdapterName, validate_name, validate_new_name
from kiln_ray.api.errors import APIError, engine_error
from kiln_ray.api.schemas import (
    UPLOAD_OPENAPI, AdapterRefBody, GrpoRequest, MergeRequest, RollbackRequest, SftRequest, TrainJobConfig,
)
from kiln_ray.training.data import TrainingDataError, grpo_group, sft_example
from kiln_ray.training.service import Job
from kiln_ray.training.trainer import TrainConfig


_FORM_FRAMING_BYTES = 64 * 1024  # allowed around an upload's file: boundaries, part headers, fields


def install_training_routes(app: FastAPI, ctx) -> None:
    routes = _TrainingRoutes(ctx)
    app.post("/v1/train/sft")(routes.sft)
    app.post("/v1/train/grpo")(routes.grpo)
    app.get("/v1/train/status")(routes.all_status)
    app.get("/v1/train/status/{job_id}")(routes.status)
    app.get("/v1/train/queue")(routes.queue)
    app.delete("/v1/train/queue/{job_id}")(routes.cancel)
    app.get("/v1/adapters")(routes.adapters)
    app.post("/v1/adapters/load")(routes.load)
    app.post("/v1/adapters/unload")(routes.unload)
    app.post("/v1/adapters/upload", openapi_extra=UPLOAD_OPENAPI)(routes.upload)
    app.post("/v1/adapters/merge")(routes.merge)
    app.delete("/v1/adapters/{name}")(routes.delete)
    app.post("/v1/adapters/{name}/rollback")(routes.rollback)
    app.get("/v1/adapters/{name}/download")(routes.download)


async def call(ctx, method: str, *args):
    """A ServingNode method through the engine client, with errors mapped to HTTP."""
    try:
        return await ctx.engine.call(method, *args)
    except Exception as error:
        mapped = engine_error(error)
        if mapped is None:
            raise
        raise mapped from None


def _receive_at_most(receive: Receive, declared: int) -> Receive:
    """`receive` that refuses a request body running past its declared Content-Length (an
    in-process or misbehaving server would otherwise hand the whole body to the parser)."""
    received = 0

    async def bounded_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > declared:
                raise APIError(400, f"the request body is longer than its Content-Length ({declared} bytes)",
                               code="invalid_content_length")
        return message

    return bounded_receive


class _TrainingRoutes:
    def __init__(self, ctx):
        self.ctx = ctx

    # -- jobs ----------------------------------------------------------------------------------

    async def sft(self, body: SftRequest) -> dict:
        name = self._adapter_name(body.adapter, body.config, "sft")
        await self._check_lora_shape(name, body.config)
        examples, raw = [], []
        for i, ex in enumerate(body.examples):
            messages = [m.model_dump(exclude_none=True) for m in ex.messages]
            try:
                examples.append(sft_example(self.ctx.tokenizer, messages, max_len=self.ctx.max_model_len))
            except TrainingDataError as error:
                raise APIError(400, f"examples[{i}]: {error}", f"examples.{i}.messages") from None
            raw.append({"messages": messages})
        job = Job("sft", name, self._train_config(body.config), activate=body.config.activate,
                  examples=examples, raw_examples=raw, webhook_url=self._webhook(body.config))
        return self._accepted(await call(self.ctx, "train_submit", job))

    async def grpo(self, body: GrpoRequest) -> dict:
        name = self._adapter_name(body.adapter, body.config, "grpo")
        await self._check_lora_shape(name, body.config)
        groups = []
        for i, group in enumerate(body.groups):
            messages = [m.model_dump(exclude_none=True) for m in group.messages]
            try:
                built = grpo_group(self.ctx.tokenizer, messages, [c.text for c in group.completions],
                                   [c.reward for c in group.completions])
            except TrainingDataError as error:
                raise APIError(400, f"groups[{i}]: {error}", f"groups.{i}") from None
            longest = max(len(e.input_ids) for e in built.examples)
            if longest > self.ctx.max_model_len:
                raise APIError(400, f"groups[{i}]: a prompt + completion is {longest} tokens; this model's context "
                                    f"is {self.ctx.max_model_len}", f"groups.{i}")
            groups.append(built)
        job = Job("grpo", name, self._train_config(body.config), activate=body.config.activate, groups=groups,
                  webhook_url=self._webhook(body.config))
        return self._accepted(await call(self.ctx, "train_submit", job))

    async def all_status(self) -> dict:
        return {"jobs": await call(self.ctx, "train_jobs")}

    async def status(self, job_id: str) -> dict:
        return await call(self.ctx, "train_status", job_id)

    async def queue(self) -> dict:
        return {"jobs": await call(self.ctx, "train_queue")}

    async def cancel(self, job_id: str) -> dict:
        return await call(self.ctx, "train_cancel", job_id)

    def _webhook(self, config: TrainJobConfig) -> str | None:
        """A job's own webhook URL is honoured only if the server allows it (a client could
        otherwise make the trainer POST to any address it can reach)."""
        if config.webhook_url and not self.ctx.config.training.allow_job_webhooks:
            raise APIError(400, "per-job webhook_url is disabled on this server (training.allow_job_webhooks)",
                           "config.webhook_url")
        return config.webhook_url

    def _adapter_name(self, adapter: str | None, config: TrainJobConfig, kind: str) -> str:
        name = adapter or config.output_name or f"{kind}-{uuid.uuid4().hex[:8]}"
        return self._new_name(name, "adapter" if adapter else "config.output_name")

    async def _check_lora_shape(self, name: str, config: TrainJobConfig) -> None:
        """A job continues its adapter's current version (unless `from_scratch`) and keeps that
        version's rank and alpha, so a different `lora_rank` or `lora_alpha` would be ignored:
        refused instead. Checked against the store at submit; a name the store does not hold
        yet takes any rank and alpha."""
        limit = self.ctx.config.engine.max_lora_rank
        if config.lora_rank is not None and config.lora_rank > limit:
            raise APIError(400, f"config.lora_rank is {config.lora_rank}; the engine serves adapters up to rank {limit} "
                                f"(engine.max_lora_rank)", "config.lora_rank")
        asked = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha}
        if config.from_scratch or all(value is None for value in asked.values()):
            return
        current = await call(self.ctx, "lora_shape", name)
        if current is None:
            return
        kept = {"lora_rank": current["r"], "lora_alpha": current["lora_alpha"]}
        for field, value in asked.items():
            if value is not None and float(value) != float(kept[field]):
                raise APIError(400, f"config.{field} is {value:g} but adapter {name!r} (version {current['version']}) "
                                    f"has {field} {kept[field]:g}: a job continues the adapter's current version, "
                                    f"whose rank and alpha it keeps; pass from_scratch: true to train a fresh "
                                    f"adapter with this {field}, or leave {field} out", f"config.{field}")

    def _train_config(self, body: TrainJobConfig) -> TrainConfig:
        d = self.ctx.config.training
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return TrainConfig(
            learning_rate=pick(body.learning_rate, d.learning_rate),
            steps=pick(body.steps, d.steps),
            epochs=body.epochs,
            lora_rank=pick(body.lora_rank, d.lora_rank),
            lora_alpha=pick(body.lora_alpha, d.lora_alpha),
            targets=tuple(self.ctx.config.engine.lora_targets),
            from_scratch=body.from_scratch,
            replay_per_step=pick(body.replay_per_step, d.replay_per_step),
            early_stop_loss=body.early_stop_loss if body.early_stop_loss is not None else d.early_stop_loss,
            max_grad_norm=pick(body.max_grad_norm, 1.0),
            publish_every=body.publish_every,
            kl_coeff=pick(body.kl_coeff, d.kl_coeff),
            clip_epsilon=pick(body.clip_epsilon, d.clip_epsilon),
            seed=pick(body.seed, 0),
        )

    @staticmethod
    def _accepted(status: dict) -> dict:
        return {"job_id": status["job_id"], "state": status["state"], "adapter": status["adapter"]}

    # -- adapters ------------------------------------------------------------------------------

    async def adapters(self) -> dict:
        return await call(self.ctx, "adapter_listing")

    async def load(self, body: AdapterRefBody) -> dict:
        return await call(self.ctx, "load", body.name, body.version)

    async def unload(self, body: AdapterRefBody) -> dict:
        versions = await call(self.ctx, "unload", body.name)
        return {"name": body.name, "unloaded_versions": versions}

    async def delete(self, name: str) -> dict:
        await call(self.ctx, "delete", self._name(name))
        return {"name": name, "deleted": True}

    async def rollback(self, name: str, body: RollbackRequest) -> dict:
        version = await call(self.ctx, "train_rollback", self._name(name), body.version)
        return {"name": name, "current_version": version}

    async def upload(self, request: Request) -> dict:
        """multipart/form-data: `file` (tar.gz), `name`, `activate`. The declared size is
        checked before anything is read, and the body is cut off where it runs past that
        size, so an oversized upload never reaches the disk (not even the parser's spool)."""
        limit = self.ctx.config.training.upload_max_bytes
        declared = request.headers.get("content-length")
        if declared is None:
            raise APIError(411, "uploads need a Content-Length", code="length_required")
        if not declared.isdigit() or int(declared) > limit + _FORM_FRAMING_BYTES:
            raise APIError(413, f"the upload is larger than {limit} bytes", "file", "upload_too_large")
        bounded = Request(request.scope, _receive_at_most(request.receive, int(declared)))
        async with bounded.form(max_files=1, max_fields=4) as form:
            file, name = form.get("file"), form.get("name")
            if not isinstance(file, UploadFile) or not isinstance(name, str):
                raise APIError(400, "send multipart/form-data with a `file` (tar.gz) and a `name`", "file")
            data = await file.read(limit + 1)
            activate = str(form.get("activate", "false")).lower() in ("1", "true", "yes", "on")
        if len(data) > limit:
            raise APIError(413, f"the upload is larger than {limit} bytes", "file", "upload_too_large")
        version = await call(self.ctx, "train_import", self._new_name(name, "name"), data, activate)
        return {"name": name, "version": version}

    async def download(self, name: str, version: int | None = None) -> Response:
        data = await call(self.ctx, "download", self._name(name), version)
        suffix = f"-v{version}" if version else ""
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{name}{suffix}.tar.gz"'})

    async def merge(self, body: MergeRequest) -> dict:
        sources = [(s.name, s.version, s.weight) for s in body.adapters]
        version = await call(self.ctx, "train_merge", self._new_name(body.name, "name"), sources, body.method,
                             body.density)
        return {"name": body.name, "version": version, "method": body.method}

    @staticmethod
    def _name(name: str) -> str:
        """The name of an adapter that may already be stored (any valid name)."""
        try:
            return validate_name(name)
        except InvalidAdapterName as error:
            raise APIError(400, str(error), "name") from None

    def _new_name(self, name: str, param: str) -> str:
        """A name an adapter is created or trained under: valid, and one `model` can select
        (not "default", not the base model's served name)."""
        try:
            return validate_new_name(name, self.ctx.model_name)
        except InvalidAdapterName as error:
            raise APIError(400, str(error), param) from None
