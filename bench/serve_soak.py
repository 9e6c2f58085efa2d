"""The served path under the load drill's traffic for minutes: does the engine replica or the
ingress grow?

    .venv/bin/python bench/serve_soak.py MINUTES [BASE_URL]

200 streaming chat clients (24 sampled tokens each, 429s honoured) against a running server
(`serve run`, e.g. serve_config.yaml); every 10 s the engine's and the ingress's RSS from
/health. At the end, the Theil-Sen slope of each after the first minute (as
tests/e2e/test_load.py computes it over its one minute).
"""
import asyncio
import itertools
import statistics
import sys
import time

import httpx

MIN = float(sys.argv[1])
BASE = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000"
CLIENTS = 200
Q = ["What do bees make?", "Name a color.", "Say hello.", "What is 2+2?", "Name a fruit."]
async def client(http, i, deadline, tally, model):
    while time.monotonic() < deadline:
        body = {"model": model, "stream": True, "max_tokens": 24, "temperature": 0.7, "seed": i, "messages": [{"role": "user", "content": Q[i % 5]}]}
        try:
            async with http.stream("POST", f"{BASE}/v1/chat/completions", json=body) as r:
                if r.status_code == 429:
                    await r.aread(); tally["429"] += 1; await asyncio.sleep(float(r.headers.get("retry-after", 1))); continue
                if r.status_code != 200:
                    tally["err"] += 1; await r.aread(); continue
                async for line in r.aiter_lines():
                    if line == "data: [DONE]": tally["ok"] += 1; break
        except Exception as e:
            tally["err"] += 1
async def main():
    tally = {"ok": 0, "429": 0, "err": 0}
    lim = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(timeout=120, limits=lim) as http:
        model = (await http.get(f"{BASE}/v1/models")).json()["data"][0]["id"]
        start = time.monotonic(); deadline = start + MIN * 60
        samples = []
        async def sample():
            while time.monotonic() < deadline:
                await asyncio.sleep(10)
                h = (await http.get(f"{BASE}/health")).json()
                s = (time.monotonic() - start, h["memory"]["engine"]["rss"] / 2**20, h["ingress_memory"]["rss"] / 2**20, h["running"] + h["waiting"])
                samples.append(s); print(f"{s[0]:5.0f}s engine {s[1]:7.1f} MiB ingress {s[2]:6.1f} MiB in server {s[3]} ok {tally['ok']} 429 {tally['429']} err {tally['err']}", flush=True)
        await asyncio.gather(sample(), *(client(http, i, deadline, tally, model) for i in range(CLIENTS)))
    for name, k in (("engine", 1), ("ingress", 2)):
        warm = [s for s in samples if s[0] >= 60]
        slopes = [(b[k] - a[k]) / (b[0] - a[0]) for a, b in itertools.combinations(warm, 2)]
        print(f"{name}: Theil-Sen after 60 s {statistics.median(slopes) * 60:+.2f} MiB/min over {len(warm)} samples; first {warm[0][k]:.0f} last {warm[-1][k]:.0f}")
    print(tally)
asyncio.run(main())
