"""The HTTP API as a FastAPI app: OpenAI-compatible chat and completions, Kiln's batch helper,
models, health and metrics. Plain FastAPI, no Ray: `create_app` takes an EngineClient, so the
same routes run in tests against an in-process engine and under Ray Serve (api/ingress.py).
The routes turn requests into engine requests and responses; api/streaming.py starts, drains
and streams those engine requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kiln_ray import logs
from kiln_ray.api import openai_format as fmt
from kiln_ray.api.chat import ChatFormatError, forced_call_prefix, render_chat
from kiln_ray.api.auth import KeyCheck, presented_key, required_access, route_path
from kiln_ray.api.engine_client import EngineClient
from kiln_ray.api.errors import APIError, error_response, install_error_handlers
from kiln_ray.api.generation import ChoiceText
from kiln_ray.api.schemas import BatchCompletionRequest, ChatCompletionRequest, CompletionRequest, SamplingFields
from kiln_ray.api.streaming import EngineStreams, Timing, sse_response
from kiln_ray.api.training_routes import call, install_training_routes
from kiln_ray.api.ui import install_ui
from kiln_ray.adapters.store import InvalidAdapterName, parse_ref
from kiln_ray.node import AdapterChoice
from kiln_ray.config import KilnConfig
from kiln_ray.engine.async_engine import EngineDeadError, GenerateRequest
from kiln_ray.api.structured import response_guide, tool_guide
from kiln_ray.engine.guide import Guide
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.metrics import Metrics
from kiln_ray.procinfo import process_memory

log = logging.getLogger("kiln_ray.api")


@dataclass
class ServerContext:
    """Everything the routes need; built once per ingress process."""

    config: KilnConfig
    engine: EngineClient
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    metrics: Metrics = field(default_factory=lambda: Metrics("ingress"))
    started: float = field(default_factory=time.time)


def _request_id(sent: str | None) -> str:
    """The client's x-request-id when it is 1-128 visible ASCII characters, else a new one."""
    if sent and len(sent) <= 128 and sent.isascii() and sent.isprintable() and " " not in sent:
        return sent
    return uuid.uuid4().hex


def _response_id(prefix: str, request: Request) -> str:
    """A fresh completion id (engine request ids must be unique, so never the client's
    x-request-id), remembered for the request's error log line."""
    request.state.response_id = f"{prefix}-{uuid.uuid4().hex}"
    return request.state.response_id


async def _compiled_off_the_loop(build, *args):
    """A guide's grammar, compiled on a worker thread: a schema with patterns can take a few
    hundred milliseconds, which would hold up every other request of this ingress."""
    return await asyncio.to_thread(build, *args)


async def _output_guide(body: SamplingFields):
    return await _compiled_off_the_loop(response_guide, body) if body.wants_structure else None


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="kiln-ray", version="0.1.0", description="OpenAI-compatible API of kiln-ray")
    install_error_handlers(app)
    api = _Routes(ctx)
    keys = KeyCheck(ctx.config.api_key, ctx.config.admin_key)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        request.state.request_id = _request_id(request.headers.get("x-request-id"))
        request.state.response_id = None  # the completion id, once a generation route made one
        named = logs.request_id.set(request.state.request_id)  # every log line of the request says which
        try:
            return await _handle(request, call_next)
        finally:
            logs.request_id.reset(named)

    async def _handle(request: Request, call_next):
        try:
            access = required_access(request.method, route_path(request.scope), ctx.config.metrics_require_key)
            keys.check(access, presented_key(request.headers))
        except APIError as refused:
            response = error_response(refused)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        ctx.metrics.inc("kiln_requests_total", route=path, status=str(response.status_code))
        response.headers["x-request-id"] = request.state.request_id
        if response.status_code >= 400:  # a successful generation logs its own line (EngineStreams.record)
            log.info("%s %s -> %d x-request-id=%s%s", request.method, request.url.path, response.status_code,
                     request.state.request_id, f" id={request.state.response_id}" if request.state.response_id else "")
        return response

    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)
    app.get("/v1/models")(api.models)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/completions/batch")(api.batch_completions)
    install_training_routes(app, ctx)
    install_ui(app)
    return app


class _Routes:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.tok = ctx.tokenizer
        self.streams = EngineStreams(ctx.engine, ctx.metrics, ctx.config.stream_interval, ctx.config.request_timeout_s)

    # -- info ----------------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        info = await self.ctx.engine.info()
        body = {"status": "ok" if info.get("alive", True) else "engine_dead", "uptime_s": round(time.time() - self.ctx.started, 1), **info,
                "ingress_memory": process_memory(os.getpid())}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics(self) -> Response:
        """The ingress's figures and the engine's and trainer's, as the engine replica that
        answers has them (with several replicas, Ray's export has each one); while the engine
        is unavailable, the ingress's alone."""
        try:
            others = await self.ctx.engine.call("metric_families")
        except EngineDeadError:
            others = []
        return Response(self.ctx.metrics.render(others), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> dict:
        base = {"id": self.ctx.model_name, "object": "model", "created": int(self.ctx.started),
                "owned_by": "kiln-ray", "max_model_len": self.ctx.max_model_len}
        listing = await call(self.ctx, "adapter_listing")
        adapters = [
            {"id": a["name"], "object": "model", "created": int(a["versions"][-1]["created_at"]) if a["versions"] else 0,
             "owned_by": "kiln-ray", "parent": self.ctx.model_name, "root": self.ctx.model_name,
             "current_version": a["current_version"], "default": a["default"]}
            for a in listing["adapters"]
        ]
        return {"object": "list", "data": [base, *adapters]}

    # -- generation ----------------------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        choice = self._choice(body)
        offered = body.offered_tools
        use_tools = offered is not None
        tools = [t.model_dump(exclude_none=True) for t in offered] if use_tools else None
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        forced = forced_call_prefix(body.forced_call)  # "required" / a named function: the reply opens a call
        prompt = self._render(messages, tools, body.chat_template_kwargs)
        prompt += self.tok.encode(forced, add_special_tokens=False) if forced else []
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        guide = await _compiled_off_the_loop(tool_guide, offered, forced) if use_tools else await _output_guide(body)
        params = self._params(body, prompt, body.token_limit, logprobs, guide=guide)
        rid = _response_id("chatcmpl", request)
        choices = [ChoiceText(self.tok, i, body.stop, use_tools, body.skip_special_tokens, forced, body.single_tool_call)
                   for i in range(body.n)]
        created = int(time.time())
        model = body.model or self.ctx.model_name
        timing = self.streams.timing()
        first, deltas = await self.streams.start(GenerateRequest(rid, prompt, params), choice, choices, timing)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(self.streams.chat_events(rid, request.state.request_id, created, model, choices, first,
                                                         deltas, body.logprobs, include_usage, len(prompt), timing))
        await self.streams.consume(deltas, timing)
        self.streams.record(rid, request.state.request_id, "chat", len(prompt), choices, timing)
        return fmt.chat_completion(rid, created, model, choices, body.logprobs, len(prompt))

    async def completions(self, body: CompletionRequest, request: Request):
        choice = self._choice(body)
        prompts = [self._encode_prompt(p) for p in body.prompts]
        created = int(time.time())
        model = body.model or self.ctx.model_name
        rid = _response_id("cmpl", request)
        runs = []
        guide = await _output_guide(body)
        for p_idx, prompt in enumerate(prompts):
            params = self._params(body, prompt, body.max_tokens, body.logprobs, guide=guide)
            choices = [
                ChoiceText(self.tok, p_idx * body.n + i, body.stop, False, body.skip_special_tokens) for i in range(body.n)
            ]
            runs.append((prompt, params, choices))
        prefix = [self.tok.decode(p, skip_special_tokens=body.skip_special_tokens) if body.echo else "" for p, _, _ in runs]
        started, timings = await self.streams.start_all(rid, runs, choice)
        all_choices = [c for _, _, choices in runs for c in choices]
        num_prompt = sum(len(p) for p, _, _ in runs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(self.streams.completion_events(
                rid, request.state.request_id, created, model, runs, started, prefix, body.echo, body.logprobs is not None,
                include_usage, num_prompt, timings))
        await self.streams.consume_all(started, timings)
        self.streams.record(rid, request.state.request_id, "completion", num_prompt, all_choices, Timing.earliest(timings))
        out = []
        for p_idx, (_, _, choices) in enumerate(runs):
            for c in choices:
                out.append({
                    "index": c.index,
                    "text": prefix[p_idx] + c.text,
                    "logprobs": fmt.completion_logprobs(c.logprobs, len(prefix[p_idx])) if body.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                })
        return fmt.text_completion(rid, created, model, out, fmt.usage(all_choices, num_prompt))

    async def batch_completions(self, body: BatchCompletionRequest, request: Request):
        """prompts x n completions in one engine batch; prompt p's completion i is sampled with
        seed + p * n + i when a seed is given."""
        choice = self._choice(body)
        rid = _response_id("batch", request)
        guide = await _output_guide(body)
        runs = []
        for p_idx, messages in enumerate(body.prompts):
            prompt = self._render([m.model_dump(exclude_none=True) for m in messages], None, body.chat_template_kwargs)
            seed = None if body.seed is None else body.seed + p_idx * body.n
            params = self._params(body, prompt, body.max_tokens, None, seed=seed, guide=guide)
            choices = [ChoiceText(self.tok, i, body.stop, False, body.skip_special_tokens) for i in range(body.n)]
            runs.append((prompt, params, choices))
        started, timings = await self.streams.start_all(rid, runs, choice)
        await self.streams.consume_all(started, timings)
        completions, totals = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for p_idx, (prompt, _, choices) in enumerate(runs):
            totals["prompt_tokens"] += len(prompt)
            for c in choices:
                totals["completion_tokens"] += c.num_tokens
                completions.append({
                    "prompt_index": p_idx,
                    "completion_index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": c.num_tokens,
                              "total_tokens": len(prompt) + c.num_tokens},
                })
        totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
        self.streams.record(rid, request.state.request_id, "batch", totals["prompt_tokens"],
                            [c for _, _, cs in runs for c in cs], Timing.earliest(timings))
        return {"id": rid, "object": "batch.completion", "model": body.model or self.ctx.model_name,
                "completions": completions, "usage": totals}

    # -- pieces --------------------------------------------------------------------------------

    def _choice(self, body: SamplingFields) -> AdapterChoice:
        """Which weights serve a request: `adapters` (a composition), `adapter`, `model` naming
        an adapter (name or name@version), the default adapter when no model is named
        ("default" or empty), else the base model."""
        try:
            if body.adapters:
                return AdapterChoice(compose=tuple((*parse_ref(a.name), a.scale) for a in body.adapters))
            ref = body.adapter or (body.model if body.model not in (None, "", "default", self.ctx.model_name) else None)
            if ref is not None:
                name, version = parse_ref(ref)
                return AdapterChoice(name, version)
        except InvalidAdapterName:
            raise APIError(404, f"model {body.model!r} does not exist (served: {self.ctx.model_name!r} and its "
                                "adapters, see /v1/models)", "model", "model_not_found") from None
        return AdapterChoice(use_default=body.model in (None, "", "default"))

    def _render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict | None) -> list[int]:
        try:
            return render_chat(self.tok, messages, tools, add_generation_prompt=True, chat_template_kwargs=kwargs)
        except ChatFormatError as error:
            raise APIError(400, str(error), "messages") from None

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", "prompt")
            return list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        if any(t < 0 or t >= self.ctx.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.ctx.vocab_size})", "prompt")
        return list(prompt)

    def _params(
        self, body: SamplingFields, prompt: list[int], max_tokens: int | None, logprobs: int | None, seed: int | None = None,
        guide: Guide | None = None,
    ) -> SamplingParams:
        max_tokens = self._max_tokens(prompt, max_tokens)
        bias = None
        if body.logit_bias:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            if any(not 0 <= k < self.ctx.vocab_size for k in bias):
                raise APIError(400, f"logit_bias token ids must be in [0, {self.ctx.vocab_size})", "logit_bias")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                min_p=body.min_p,
                seed=body.seed if seed is None else seed,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=bias,
                ignore_eos=body.ignore_eos,
                min_tokens=min(body.min_tokens, max_tokens),
                logprobs=logprobs,
                n=body.n,
                guide=guide,
            )
        except ValueError as error:
            raise APIError(400, str(error)) from None

    def _max_tokens(self, prompt: list[int], max_tokens: int | None) -> int:
        """The request's max_tokens, or what is left of the context when it names none; a 400
        when the prompt, or the prompt and max_tokens, do not fit the context."""
        limit = self.ctx.max_model_len
        if len(prompt) >= limit:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens", "messages", "context_length_exceeded")
        if max_tokens is None:
            return limit - len(prompt)
        if len(prompt) + max_tokens > limit:
            raise APIError(
                400,
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {len(prompt) + max_tokens} exceeds this "
                f"model's context of {limit} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens
