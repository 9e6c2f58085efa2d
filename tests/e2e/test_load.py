"""Load: 200 concurrent streaming clients for 60 s on the default model, through real Ray
Serve. Zero errors besides documented 429s (each with Retry-After), nothing leaked afterwards,
and memory flat after the warm-up."""

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.test_serve import wait_idle

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CLIENTS, SECONDS, WARM_UP = 200, 60.0, 15.0
QUESTIONS = ["What do bees make?", "Name a color.", "Say hello.", "What is 2+2?", "Name a fruit."]


async def _client(http, base, model, index, deadline, tally):
    while time.monotonic() < deadline:
        body = {"model": model, "stream": True, "max_tokens": 24, "temperature": 0.7, "seed": index,
                "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]}
        try:
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                if r.status_code == 429:
                    assert r.headers.get("retry-after"), "a 429 without Retry-After"
                    await r.aread()
                    tally["429"] += 1
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    continue
                if r.status_code != 200:
                    tally["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                done, tokens = False, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        tally["errors"].append(f"stream error: {event['error']}")
                        break
                    tokens += sum(1 for c in event["choices"] if c["delta"].get("content"))
                if done:
                    tally["ok"] += 1
                    tally["chunks"] += tokens
                elif not tally["errors"] or "stream error" not in tally["errors"][-1]:
                    tally["errors"].append("stream ended without [DONE]")
        except (httpx.HTTPError, AssertionError) as error:
            tally["errors"].append(f"{type(error).__name__}: {error}")


async def _run(base, model, memory_samples):
    tally = {"ok": 0, "429": 0, "chunks": 0, "errors": []}
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        start = time.monotonic()
        deadline = start + SECONDS

        async def sample_memory():
            while time.monotonic() < deadline:
                await asyncio.sleep(5.0)
                info = (await http.get(f"{base}/health")).json()
                memory_samples.append((time.monotonic() - start, info["memory"]["engine"]["rss"],
                                       info["ingress_memory"]["rss"]))

        await asyncio.gather(sample_memory(),
                             *(_client(http, base, model, i, deadline, tally) for i in range(CLIENTS)))
    return tally


def test_two_hundred_streaming_clients_for_a_minute(serve_app, model_id):
    samples: list[tuple[float, int, int]] = []
    tally = asyncio.run(_run(serve_app, model_id, samples))
    idle = wait_idle(serve_app, timeout=60)
    warm = [s for s in samples if s[0] >= WARM_UP]
    engine_growth = (warm[-1][1] - warm[0][1]) / 2**20
    ingress_growth = (warm[-1][2] - warm[0][2]) / 2**20
    print(f"\n{CLIENTS} clients x {SECONDS:.0f} s: {tally['ok']} streams completed ({tally['chunks']} content chunks), "
          f"{tally['429']} documented 429s, {len(tally['errors'])} errors; RSS after warm-up: engine "
          f"{warm[0][1] / 2**20:.0f} -> {warm[-1][1] / 2**20:.0f} MiB, ingress {warm[0][2] / 2**20:.0f} -> "
          f"{warm[-1][2] / 2**20:.0f} MiB")
    assert not tally["errors"], tally["errors"][:5]
    assert tally["ok"] > 50  # served throughout, not only refused
    assert tally["429"] > 0  # the limits were reached: backpressure, not unbounded queueing
    assert idle["kv_blocks_used"] == 0 and idle["state_slots_used"] == 0
    assert idle["running"] == 0 and idle["waiting"] == 0
    assert len(warm) >= 3
    assert engine_growth < 64 and ingress_growth < 64, (engine_growth, ingress_growth)
