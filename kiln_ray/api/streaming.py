"""A generation route's engine requests, from submission to the last byte: the first batch is
awaited before any response goes out (so a refusal, or no first token before the deadline, is
still an HTTP status), then the rest is either drained into the choices (a JSON body) or sent
as SSE events, every `stream_interval` engine batches. All of it under the request's deadline
(`request_timeout_s`), with the latency metrics and the request's log line on the way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from kiln_ray.api import openai_format as fmt
from kiln_ray.api.engine_client import EngineClient
from kiln_ray.api.errors import APIError, engine_error
from kiln_ray.api.generation import ChoiceText, Delta, merge_deltas
from kiln_ray.engine.async_engine import GenerateRequest
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.metrics import Metrics
from kiln_ray.node import AdapterChoice

log = logging.getLogger("kiln_ray.api")

Run = tuple[list[int], SamplingParams, list[ChoiceText]]  # one engine request: prompt, params, its choices
Started = tuple[list[Delta] | None, AsyncIterator[list[Delta]]]  # its first deltas (None: it ended at once), the rest
ChunkFor = Callable[[list[Delta]], str | None]  # deltas -> their SSE event, None when there is nothing to send


@dataclass
class Timing:
    """When a request started, must end (request_timeout_s later), produced its first token,
    and last heard of each choice."""

    deadline: float  # event-loop time: past it, the request fails with 504 (waiting for its first token too)
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: dict[int, float] = field(default_factory=dict)  # choice index -> time of its last tokens
    failed: bool = False  # a stream that ended in an error event

    @staticmethod
    def earliest(timings: list[Timing]) -> Timing:
        """One request's timing from those of its prompts: first start, first token, any failure."""
        firsts = [t.first for t in timings if t.first is not None]
        return Timing(timings[0].deadline, min(t.start for t in timings), min(firsts) if firsts else None,
                      failed=any(t.failed for t in timings))


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class EngineStreams:
    """Starts, drains and streams the engine requests of the generation routes. Holds no
    per-request state: each request's lives in its Timing and its ChoiceTexts, which the
    calls here fill in (text, finish reasons, token counts) as the engine's outputs arrive."""

    def __init__(self, engine: EngineClient, metrics: Metrics, stream_interval: int, request_timeout_s: float):
        self.engine = engine
        self.metrics = metrics
        self.stream_interval = stream_interval
        self.request_timeout_s = request_timeout_s

    def timing(self) -> Timing:
        """A new request's Timing: its deadline is request_timeout_s from now."""
        return Timing(asyncio.get_running_loop().time() + self.request_timeout_s)

    # -- starting and draining ----------------------------------------------------------------

    async def start(self, gen: GenerateRequest, choice: AdapterChoice, choices: list[ChoiceText],
                    timing: Timing) -> Started:
        """Submit and wait for the first batch, so a refusal (or no first token before the
        deadline: 504, the engine request aborted) is an HTTP error rather than a broken
        stream. Returns (first deltas or None, the rest)."""
        deltas = self._deltas(gen, choice, choices, timing)
        async with self._as_api_errors(timing):  # on a timeout the cancelled generator has aborted
            try:
                first = await deltas.__anext__()
            except StopAsyncIteration:
                return None, deltas
        return first, deltas

    async def start_all(self, rid: str, runs: list[Run], choice: AdapterChoice) -> tuple[list[Started], list[Timing]]:
        """`start` one engine request per run, together, run i as `{rid}-{i}` with a Timing of
        its own. If any is refused, the others are closed and the (first) refusal raised."""
        timings = [self.timing() for _ in runs]
        started = await asyncio.gather(
            *(self.start(GenerateRequest(f"{rid}-{i}", p, params), choice, choices, timings[i])
              for i, (p, params, choices) in enumerate(runs)),
            return_exceptions=True,
        )
        refusals = [s for s in started if isinstance(s, BaseException)]
        if refusals:
            await asyncio.gather(*(s[1].aclose() for s in started if not isinstance(s, BaseException)))
            raise refusals[0]
        return started, timings

    async def consume(self, rest: AsyncIterator[list[Delta]], timing: Timing) -> None:
        """Drive a non-streamed request to its end (the choices collect the text)."""
        async with self._as_api_errors(timing), aclosing(rest):
            async for _ in rest:
                pass

    @asynccontextmanager
    async def _as_api_errors(self, timing: Timing):
        """The request's deadline, and engine failures as the APIErrors they mean (504 past the
        deadline)."""
        try:
            async with asyncio.timeout_at(timing.deadline):
                yield
        except TimeoutError:
            raise self._timeout() from None
        except Exception as error:
            mapped = engine_error(error)
            if mapped is None:
                raise
            raise mapped from None

    async def consume_all(self, started: list[Started], timings: list[Timing]) -> None:
        """`consume` the requests `start_all` started, together. The first to fail fails them
        all: the others are cancelled (so their engine requests are aborted), not left running
        for a reply that was already sent."""
        tasks = [asyncio.ensure_future(self.consume(rest, t)) for (_, rest), t in zip(started, timings)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def record(self, rid: str, request_id: str, kind: str, num_prompt: int, choices: list[ChoiceText],
               timing: Timing, outcome: str | None = None) -> None:
        """Count a request that ended and log its line: the completion id and the client's
        x-request-id (or the one made for it) side by side, so either finds the other.
        `outcome`: "disconnected" for a client that left mid-stream; a stream that failed says
        "error". Those count their tokens but stay out of the latency histogram."""
        m = self.metrics
        outcome = outcome or ("error" if timing.failed else None)
        completion = sum(c.num_tokens for c in choices)
        elapsed = time.perf_counter() - timing.start
        m.inc("kiln_prompt_tokens_total", num_prompt)
        m.inc("kiln_generation_tokens_total", completion)
        if outcome is None:
            m.observe("kiln_e2e_request_latency_seconds", elapsed)
        ttft = f"{(timing.first - timing.start) * 1e3:.0f}ms" if timing.first else "-"
        finish = outcome or ",".join(str(c.finish_reason) for c in choices)
        log.info("%s %s x-request-id=%s prompt=%d completion=%d ttft=%s total=%.0fms finish=%s", rid, kind, request_id,
                 num_prompt, completion, ttft, elapsed * 1e3, finish)

    async def _deltas(
        self, gen: GenerateRequest, choice: AdapterChoice, choices: list[ChoiceText], timing: Timing
    ) -> AsyncIterator[list[Delta]]:
        """Engine batches -> one delta per choice that changed (a batch may hold several
        increments of one choice); ends (aborting the engine request) once every choice has
        finished, e.g. on stop strings."""
        metrics = self.metrics
        async with aclosing(self.engine.generate(gen, choice)) as stream:
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

    def _timeout(self) -> APIError:
        return APIError(504, f"the request took longer than {self.request_timeout_s:g} s", code="timeout")

    # -- streaming ----------------------------------------------------------------------------

    async def chat_events(self, rid: str, request_id: str, created: int, model: str, choices: list[ChoiceText],
                          first: list[Delta] | None, rest: AsyncIterator[list[Delta]], want_logprobs: bool,
                          include_usage: bool, num_prompt: int, timing: Timing) -> AsyncIterator[str]:
        """A chat.completion.chunk stream for one started request: the role in each choice's
        first chunk, the usage chunk when asked for, the log line, then [DONE]."""
        sent_role = set()

        def chunk_for(deltas: list[Delta]) -> str | None:
            entries = []
            for d in deltas:
                entry = fmt.chat_delta(d, choices[d.index], want_logprobs, d.index not in sent_role)
                if entry is not None:
                    sent_role.add(d.index)
                    entries.append(entry)
            return fmt.chat_chunk(rid, created, model, entries) if entries else None

        async def events() -> AsyncIterator[str]:
            async for event in self._stream_body(first, rest, chunk_for, timing):
                yield event
            if include_usage:
                yield fmt.chat_chunk(rid, created, model, [], fmt.usage(choices, num_prompt))

        record = functools.partial(self.record, rid, request_id, "chat", num_prompt, choices, timing)
        async for event in _recorded_then_done(events(), record):
            yield event

    async def completion_events(self, rid: str, request_id: str, created: int, model: str, runs: list[Run],
                                started: list[Started], prefix: list[str], echo: bool, want_logprobs: bool,
                                include_usage: bool, num_prompt: int, timings: list[Timing]) -> AsyncIterator[str]:
        """A text_completion stream for the requests `start_all` started (one per prompt),
        their events interleaved as they come: with `echo`, each choice's prompt text
        (`prefix`) first; the usage chunk when asked for, the log line, then [DONE]."""
        offsets = {c.index: len(prefix[p]) for p, (_, _, cs) in enumerate(runs) for c in cs}  # logprobs' text_offset

        def chunk_for(deltas: list[Delta]) -> str | None:
            entries = []
            for d in deltas:
                if not d.text and d.finish_reason is None and not d.logprobs:
                    continue
                lp = fmt.completion_logprobs(d.logprobs, offsets[d.index]) if want_logprobs else None
                offsets[d.index] += len(d.text)
                entries.append({"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
            return fmt.completion_chunk(rid, created, model, entries) if entries else None

        bodies = [self._stream_body(first, rest, chunk_for, t) for (first, rest), t in zip(started, timings)]
        all_choices = [c for _, _, cs in runs for c in cs]

        async def events() -> AsyncIterator[str]:
            if echo:
                for p_idx, (_, _, choices) in enumerate(runs):
                    for c in choices:
                        yield fmt.completion_chunk(rid, created, model, [{"index": c.index, "text": prefix[p_idx],
                                                                          "logprobs": None, "finish_reason": None}])
            async with aclosing(_interleaved(bodies)) as interleaved:
                async for event in interleaved:
                    yield event
            if include_usage:
                yield fmt.completion_chunk(rid, created, model, [], fmt.usage(all_choices, num_prompt))

        record = lambda outcome=None: self.record(  # noqa: E731 - the timing is taken when the request ends
            rid, request_id, "completion", num_prompt, all_choices, Timing.earliest(timings), outcome)
        async for event in _recorded_then_done(events(), record):
            yield event

    async def _stream_body(self, first: list[Delta] | None, rest: AsyncIterator[list[Delta]], chunk_for: ChunkFor,
                           timing: Timing) -> AsyncIterator[str]:
        """SSE events for one engine request: the first batch at once, then one event per
        `stream_interval` engine batches (sooner when a choice finishes). An error after the
        headers went out becomes an error event (the status line cannot change any more)."""
        interval = self.stream_interval
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
            error_event = _error_event(error)
        if pending:
            try:
                event = chunk_for(merge_deltas(pending))
            except Exception as error:  # noqa: BLE001 - as above
                event, flush_error = None, _error_event(error)
                error_event = error_event or flush_error
            if event:
                yield event
        if error_event is not None:
            timing.failed = True
            yield error_event


async def _recorded_then_done(events: AsyncIterator[str], record: Callable[..., None]) -> AsyncIterator[str]:
    """A stream's events, its log line (`record()`), then [DONE]. A stream that stops early is
    recorded once too: "error" if our code failed, else "disconnected" (the client left)."""
    recorded, outcome = False, "disconnected"
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        recorded = True
        record()
        yield fmt.SSE_DONE
    except Exception:
        outcome = "error"
        raise
    finally:
        if not recorded:
            record(outcome=outcome)


def _error_event(error: Exception) -> str:
    """The SSE error event for an error after the headers went out."""
    mapped = engine_error(error)
    if mapped is None:
        log.exception("stream failed")
        mapped = APIError(500, f"internal error ({type(error).__name__})", code="internal_error")
    return fmt.sse(mapped.body())


async def _interleaved(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The events of several streams in the order they come, each stream drained by a task of
    its own; closing this cancels the tasks still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(events: AsyncIterator[str]) -> None:
        try:
            async for event in events:
                await queue.put(event)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
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
