"""The load generator for every HTTP server (kiln-ray, vLLM, llama.cpp): waves of concurrent
streaming `/v1/completions` requests, one asyncio event loop, httpx.

A wave sends `concurrency` requests at once (the same shape as the in-process paths, which
add a batch of requests together) and waits for all of them. Every server gets the same text
prompts, greedy decoding, and fields that make it generate exactly `new_tokens` tokens.

Timing: each streamed chunk's arrival time is recorded with its text. TTFT is the first
non-empty chunk; a chunk carrying k tokens counts as k tokens whose inter-token latencies split
its gap evenly (servers may coalesce tokens under load). The token count of a request is the
server's usage when it reports one, else `new_tokens`; tokens are attributed to chunks in
proportion to each chunk's re-tokenised length.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from prompts import Prompt
from results import Run, summarize


@dataclass(frozen=True)
class Endpoint:
    """A running OpenAI-compatible server and the request fields it needs."""

    system: str
    base_url: str
    model: str
    extra_body: dict = field(default_factory=dict)  # e.g. {"ignore_eos": True}


@dataclass
class Trace:
    """One streamed request: (arrival time, text) per non-empty chunk; usage if reported."""

    chunks: list[tuple[float, str]] = field(default_factory=list)
    completion_tokens: int | None = None


class StreamError(RuntimeError):
    """The server reported an error inside the stream (after a 200 status)."""


async def _stream_one(client: httpx.AsyncClient, endpoint: Endpoint, prompt: str, new_tokens: int) -> Trace:
    body = {"model": endpoint.model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **endpoint.extra_body}
    trace = Trace()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise StreamError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise StreamError(str(chunk["error"])[:300])
            if chunk.get("usage"):
                trace.completion_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    trace.chunks.append((now, choice["text"]))
    return trace


def token_times(trace: Trace, new_tokens: int, count_tokens: Callable[[str], int]) -> list[float]:
    """The arrival time of each of the request's tokens (see the module docstring)."""
    n = trace.completion_tokens or new_tokens
    chunks = trace.chunks
    if not chunks:
        return []
    if len(chunks) == n:
        return [t for t, _ in chunks]
    weights = [max(1, count_tokens(text)) for _, text in chunks]
    total, cumulative, assigned = sum(weights), 0, 0
    times: list[float] = []
    previous = chunks[0][0]
    for (t, _), w in zip(chunks, weights):
        cumulative += w
        k = round(n * cumulative / total) - assigned  # tokens of this chunk; the counts sum to n
        assigned += k
        times.extend(previous + (t - previous) * (j + 1) / k for j in range(k))
        previous = t
    return times


async def _wave(client: httpx.AsyncClient, endpoint: Endpoint, prompts: list[Prompt], new_tokens: int,
                timeout: float) -> tuple[float, list[Trace | BaseException]]:
    start = time.perf_counter()
    tasks = [asyncio.create_task(_stream_one(client, endpoint, p.text, new_tokens)) for p in prompts]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    results: list[Trace | BaseException] = []
    for task in tasks:
        if task in pending:
            results.append(TimeoutError(f"no answer in {timeout:.0f} s"))
        elif task.exception() is not None:
            results.append(task.exception())
        else:
            results.append(task.result())
    return start, results


class LoadGenerator:
    """Drives one server: `measure` runs one wave and summarises it. One connection pool serves
    all of a server's waves (connection set-up is paid in the warm-up); `aclose` it at the end.
    All calls must run on the same event loop."""

    def __init__(self, endpoint: Endpoint, count_tokens: Callable[[str], int], max_concurrency: int,
                 wave_timeout: float = 900.0):
        self.endpoint = endpoint
        self.count_tokens = count_tokens
        self.wave_timeout = wave_timeout
        self.client = httpx.AsyncClient(
            base_url=endpoint.base_url, timeout=httpx.Timeout(wave_timeout, connect=30.0),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def prompt_tokens(self, prompt: Prompt) -> int | None:
        """The server's count of `prompt`'s tokens (one non-streamed 1-token request), if it
        reports usage."""
        body = {"model": self.endpoint.model, "prompt": prompt.text, "max_tokens": 1, "temperature": 0.0}
        response = await self.client.post("/v1/completions", json=body)
        response.raise_for_status()
        return (response.json().get("usage") or {}).get("prompt_tokens")

    async def measure(self, prompts: list[Prompt], new_tokens: int, model_name: str, dtype: str) -> Run:
        start, results = await _wave(self.client, self.endpoint, prompts, new_tokens, self.wave_timeout)
        traces = [r for r in results if isinstance(r, Trace)]
        failures = [r for r in results if not isinstance(r, Trace)]
        for error in failures[:3]:
            print(f"  [{self.endpoint.system}] request failed: {type(error).__name__}: {error}")
        # A request that generated another number of tokens than asked did other work: an error.
        short = [t for t in traces if t.completion_tokens is not None and t.completion_tokens != new_tokens]
        if short:
            print(f"  [{self.endpoint.system}] {len(short)} requests returned "
                  f"{sorted({t.completion_tokens for t in short})} tokens instead of {new_tokens}")
        times = [token_times(t, new_tokens, self.count_tokens) for t in traces]
        return summarize(self.endpoint.system, model_name, dtype, len(prompts), len(prompts[0].ids), new_tokens,
                         start, times, errors=len(failures) + len(short))
