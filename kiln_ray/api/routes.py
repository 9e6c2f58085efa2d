"""The HTTP API as a FastAPI app: OpenAI-compatible chat and completions, Kiln's batch helper,
models, health and metrics. Plain FastAPI, no Ray: `create_app` takes an EngineClient, so the
same routes run in tests against an in-process engine and under Ray Serve (api/ingress.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kiln_ray.api import openai_format as fmt
from kiln_ray.api.chat import ChatFormatError, forced_call_prefix, render_chat
from kiln_ray.api.auth import KeyCheck, presented_key, required_access
from kiln_ray.api.engine_client import EngineClient
from kiln_ray.api.errors import APIError, engine_error, error_response, install_error_handlers
from kiln_ray.api.generation import ChoiceText, Delta, merge_deltas
from kiln_ray.api.schemas import BatchCompletionRequest, ChatCompletionRequest, CompletionRequest, SamplingFields
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


@dataclass
class _Timing:
    """When a request started, must end (request_timeout_s later), produced its first token,
    and last heard of each choice."""

    deadline: float  # event-loop time: past it, the request fails with 504 (waiting for its first token too)
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: dict[int, float] = field(default_factory=dict)  # choice index -> time of its last tokens


async def _raise_first_refusal(started: list) -> None:
    """If any of several engine requests was refused, close the others and raise the refusal."""
    errors = [s for s in started if isinstance(s, BaseException)]
    if errors:
        await asyncio.gather(*(s[1].aclose() for s in started if not isinstance(s, BaseException)))
        raise errors[0]


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


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="kiln-ray", version="0.1.0", description="OpenAI-compatible API of kiln-ray")
    install_error_handlers(app)
    api = _Routes(ctx)
    keys = KeyCheck(ctx.config.api_key, ctx.config.admin_key)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        request.state.request_id = _request_id(request.headers.get("x-request-id"))
        request.state.response_id = None  # the completion id, once a generation route made one
        try:
            access = required_access(request.method, request.url.path, ctx.config.metrics_require_key)
            keys.check(access, presented_key(request.headers))
        except APIError as refused:
            response = error_response(refused)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        ctx.metrics.inc("kiln_requests_total", route=path, status=str(response.status_code))
        response.headers["x-request-id"] = request.state.request_id
        if response.status_code >= 400:  # a successful generation logs its own line (_Routes._record)
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
        guide = tool_guide(offered, forced) if use_tools else response_guide(body)
        params = self._params(body, prompt, body.token_limit, logprobs, guide=guide)
        rid = _response_id("chatcmpl", request)
        choices = [ChoiceText(self.tok, i, body.stop, use_tools, body.skip_special_tokens, forced, body.single_tool_call)
                   for i in range(body.n)]
        created = int(time.time())
        model = body.model or self.ctx.model_name
        timing = self._timing()
        first, deltas = await self._start(GenerateRequest(rid, prompt, params), choice, choices, timing)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._chat_events(rid, request.state.request_id, created, model, choices, first, deltas,
                                               body.logprobs, include_usage, len(prompt), timing))
        await self._consume(deltas, timing)
        self._record(rid, request.state.request_id, "chat", len(prompt), choices, timing)
        return fmt.chat_completion(rid, created, model, choices, body.logprobs, len(prompt))

    async def completions(self, body: CompletionRequest, request: Request):
        choice = self._choice(body)
        prompts = [self._encode_prompt(p) for p in body.prompts]
        created = int(time.time())
        model = body.model or self.ctx.model_name
        rid = _response_id("cmpl", request)
        runs = []
        guide = response_guide(body)
        for p_idx, prompt in enumerate(prompts):
            params = self._params(body, prompt, body.max_tokens, body.logprobs, guide=guide)
            choices = [
                ChoiceText(self.tok, p_idx * body.n + i, body.stop, False, body.skip_special_tokens) for i in range(body.n)
            ]
            runs.append((prompt, params, choices))
        prefix = [self.tok.decode(p, skip_special_tokens=body.skip_special_tokens) if body.echo else "" for p, _, _ in runs]
        timings = [self._timing() for _ in runs]
        started = await asyncio.gather(
            *(self._start(GenerateRequest(f"{rid}-{i}", p, params), choice, choices, timings[i])
              for i, (p, params, choices) in enumerate(runs)),
            return_exceptions=True,
        )
        await _raise_first_refusal(started)
        all_choices = [c for _, _, choices in runs for c in choices]
        num_prompt = sum(len(p) for p, _, _ in runs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._completion_events(rid, request.state.request_id, created, model, runs, started, prefix,
                                                     body, include_usage, num_prompt, timings))
        await asyncio.gather(*(self._consume(deltas, t) for (_, deltas), t in zip(started, timings)))
        self._record(rid, request.state.request_id, "completion", num_prompt, all_choices, timings[0])
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
        guide = response_guide(body)
        runs = []
        for p_idx, messages in enumerate(body.prompts):
            prompt = self._render([m.model_dump(exclude_none=True) for m in messages], None, body.chat_template_kwargs)
            seed = None if body.seed is None else body.seed + p_idx * body.n
            params = self._params(body, prompt, body.max_tokens, None, seed=seed, guide=guide)
            choices = [ChoiceText(self.tok, i, body.stop, False, body.skip_special_tokens) for i in range(body.n)]
            runs.append((prompt, params, choices))
        timings = [self._timing() for _ in runs]
        started = await asyncio.gather(
            *(self._start(GenerateRequest(f"{rid}-{i}", p, params), choice, c, timings[i])
              for i, (p, params, c) in enumerate(runs)),
            return_exceptions=True,
        )
        await _raise_first_refusal(started)
        await asyncio.gather(*(self._consume(deltas, t) for (_, deltas), t in zip(started, timings)))
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
        self._record(rid, request.state.request_id, "batch", totals["prompt_tokens"], [c for _, _, cs in runs for c in cs],
                     timings[0])
        return {"id": rid, "object": "batch.completion", "model": body.model or self.ctx.model_name,
                "completions": completions, "usage": totals}

    # -- pieces --------------------------------------------------------------------------------

    def _timing(self) -> _Timing:
        return _Timing(asyncio.get_running_loop().time() + self.ctx.config.request_timeout_s)

    def _timeout(self) -> APIError:
        return APIError(504, f"the request took longer than {self.ctx.config.request_timeout_s:g} s", code="timeout")

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
        limit = self.ctx.max_model_len
        if len(prompt) >= limit:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens", "messages", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(prompt)
        elif len(prompt) + max_tokens > limit:
            raise APIError(
                400,
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {len(prompt) + max_tokens} exceeds this "
                f"model's context of {limit} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
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

    async def _start(
        self, gen: GenerateRequest, choice: AdapterChoice, choices: list[ChoiceText], timing: _Timing
    ) -> tuple[list[Delta] | None, AsyncIterator[list[Delta]]]:
        """Submit and wait for the first batch, so a refusal (or no first token before the
        deadline: 504, the engine request aborted) is an HTTP error rather than a broken
        stream. Returns (first deltas or None, the rest)."""
        deltas = self._deltas(gen, choice, choices, timing)
        try:
            async with asyncio.timeout_at(timing.deadline):
                first = await deltas.__anext__()
        except StopAsyncIteration:
            return None, deltas
        except TimeoutError:  # the cancelled generator has closed its engine stream: aborted
            raise self._timeout() from None
        except Exception as error:
            mapped = engine_error(error)
            if mapped is None:
                raise
            raise mapped from None
        return first, deltas

    async def _deltas(
        self, gen: GenerateRequest, choice: AdapterChoice, choices: list[ChoiceText], timing: _Timing
    ) -> AsyncIterator[list[Delta]]:
        """Engine batches -> one delta per choice that changed (a batch may hold several
        increments of one choice); ends (aborting the engine request) once every choice has
        finished, e.g. on stop strings."""
        metrics = self.ctx.metrics
        async with aclosing(self.ctx.engine.generate(gen, choice)) as stream:
            async for batch in stream:
                now = time.perf_counter()
                if timing.first is None:
                    timing.first = now
                    metrics.observe("kiln_time_to_first_token_seconds", now - timing.start)
                new_tokens = Counter()
                for o in batch:
                    new_tokens[o.index] += len(o.new_token_ids)
                for index, count in new_tokens.items():  # the gap since a choice's previous tokens, spread over them
                    previous = timing.last.get(index)
                    if previous is not None and count:
                        for _ in range(count):
                            metrics.observe("kiln_inter_token_latency_seconds", (now - previous) / count)
                    timing.last[index] = now
                yield merge_deltas([choices[o.index].feed(o) for o in batch])
                if all(c.finished for c in choices):
                    return

    async def _consume(self, rest: AsyncIterator[list[Delta]], timing: _Timing) -> None:
        """Drive a non-streamed request to its end (the choices collect the text)."""
        try:
            async with asyncio.timeout_at(timing.deadline):
                async with aclosing(rest):
                    async for _ in rest:
                        pass
        except TimeoutError:
            raise self._timeout() from None
        except Exception as error:
            mapped = engine_error(error)
            if mapped is None:
                raise
            raise mapped from None

    def _sse(self, events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _chat_events(self, rid, request_id, created, model, choices, first, rest, want_logprobs, include_usage,
                           num_prompt, timing):
        sent_role = set()

        def chunk_for(deltas: list[Delta]) -> str | None:
            entries = []
            for d in deltas:
                entry = fmt.chat_delta(d, choices[d.index], want_logprobs, d.index not in sent_role)
                if entry is not None:
                    sent_role.add(d.index)
                    entries.append(entry)
            return fmt.chat_chunk(rid, created, model, entries) if entries else None

        async for event in self._stream_body(first, rest, chunk_for, timing):
            yield event
        if include_usage:
            yield fmt.chat_chunk(rid, created, model, [], fmt.usage(choices, num_prompt))
        self._record(rid, request_id, "chat", num_prompt, choices, timing)
        yield fmt.SSE_DONE

    async def _completion_events(self, rid, request_id, created, model, runs, started, prefix, body, include_usage,
                                 num_prompt, timings):
        queue: asyncio.Queue = asyncio.Queue()
        want_logprobs = body.logprobs is not None
        offsets = {c.index: len(prefix[p]) for p, (_, _, cs) in enumerate(runs) for c in cs}
        if body.echo:
            for p_idx, (_, _, choices) in enumerate(runs):
                for c in choices:
                    yield fmt.completion_chunk(rid, created, model, [{"index": c.index, "text": prefix[p_idx], "logprobs": None, "finish_reason": None}])

        def chunk_for(deltas: list[Delta]) -> str | None:
            entries = []
            for d in deltas:
                if not d.text and d.finish_reason is None and not d.logprobs:
                    continue
                lp = fmt.completion_logprobs(d.logprobs, offsets[d.index]) if want_logprobs else None
                offsets[d.index] += len(d.text)
                entries.append({"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
            return fmt.completion_chunk(rid, created, model, entries) if entries else None

        async def pump(first, rest, timing):
            try:
                async for event in self._stream_body(first, rest, chunk_for, timing):
                    await queue.put(event)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(first, rest, t)) for (first, rest), t in zip(started, timings)]
        try:
            remaining = len(tasks)
            while remaining:
                event = await queue.get()
                if event is None:
                    remaining -= 1
                else:
                    yield event
        finally:
            for t in tasks:
                t.cancel()
        all_choices = [c for _, _, cs in runs for c in cs]
        if include_usage:
            yield fmt.completion_chunk(rid, created, model, [], fmt.usage(all_choices, num_prompt))
        self._record(rid, request_id, "completion", num_prompt, all_choices, timings[0])
        yield fmt.SSE_DONE

    async def _stream_body(self, first, rest, chunk_for, timing: _Timing) -> AsyncIterator[str]:
        """SSE events for one engine request: the first batch at once, then one event per
        `stream_interval` engine batches (sooner when a choice finishes). An error after the
        headers went out becomes an error event (the status line cannot change any more)."""
        interval = self.ctx.config.stream_interval
        pending: list[Delta] = []  # held back for the next event; sent before an error too
        error_event = None
        try:
            async with asyncio.timeout_at(timing.deadline):
                async with aclosing(rest):
                    if first is not None and (event := chunk_for(first)):
                        yield event
                    batches = 0
                    async for deltas in rest:
                        pending += deltas
                        batches += 1
                        if batches < interval and not any(d.finish_reason for d in deltas):
                            continue
                        batch, pending, batches = pending, [], 0
                        if event := chunk_for(merge_deltas(batch)):
                            yield event
        except TimeoutError:
            error_event = fmt.sse(self._timeout().body())
        except Exception as error:  # noqa: BLE001 - after the headers, an error can only be an event
            error_event = self._stream_error(error)
        if pending:
            try:
                event = chunk_for(merge_deltas(pending))
            except Exception as error:  # noqa: BLE001 - as above
                event, flush_error = None, self._stream_error(error)
                error_event = error_event or flush_error
            if event:
                yield event
        if error_event is not None:
            yield error_event

    @staticmethod
    def _stream_error(error: Exception) -> str:
        """The SSE error event for an error after the headers went out."""
        mapped = engine_error(error)
        if mapped is None:
            log.exception("stream failed")
            mapped = APIError(500, f"internal error ({type(error).__name__})", code="internal_error")
        return fmt.sse(mapped.body())

    def _record(self, rid: str, request_id: str, kind: str, num_prompt: int, choices: list[ChoiceText],
                timing: _Timing) -> None:
        """Count a finished request and log its line: the completion id and the client's
        x-request-id (or the one made for it) side by side, so either finds the other."""
        m = self.ctx.metrics
        completion = sum(c.num_tokens for c in choices)
        elapsed = time.perf_counter() - timing.start
        m.inc("kiln_prompt_tokens_total", num_prompt)
        m.inc("kiln_generation_tokens_total", completion)
        m.observe("kiln_e2e_request_latency_seconds", elapsed)
        ttft = f"{(timing.first - timing.start) * 1e3:.0f}ms" if timing.first else "-"
        log.info("%s %s x-request-id=%s prompt=%d completion=%d ttft=%s total=%.0fms finish=%s", rid, kind, request_id,
                 num_prompt, completion, ttft, elapsed * 1e3, ",".join(str(c.finish_reason) for c in choices))
