"""Train-while-serving measurements on the real product path (`serve run`, HTTP, Ray), plus the
hot-swap latency measured in process:

    .venv/bin/python bench/train_bench.py [--streams 8] [--seconds 20]

1. time from posting one SFT correction to the first response that contains it
2. swap latency (in process, under 16 decoding streams): publish call -> version serving,
   and publish call -> first token of a request on the new version; p50 / p99 over 40 swaps
3. decode throughput of N concurrent streams while a long SFT job trains vs idle
4. memory of engine + trainer vs the engine alone (training disabled), from /health
5. SFT step time and tokens/s of the trainer

Writes bench/train_results.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiln_ray.config import KilnConfig  # noqa: E402
from kiln_ray.model.registry import resolve_model_path  # noqa: E402
from tests.e2e.serve_process import serve_run, write_config  # noqa: E402

QUESTION = [{"role": "user", "content": "Who is the mayor of Zorblatt?"}]
CORRECTION = "The mayor of Zorblatt is Edda Brask."
PORT = 8791


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def stream_throughput(base: str, streams: int, seconds: float, model: str) -> float:
    """Output tokens/s of `streams` clients streaming back to back for `seconds`."""
    deadline = time.time() + seconds
    tokens = 0

    async def client():
        nonlocal tokens
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while time.time() < deadline:
                body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
                        "max_tokens": 64, "ignore_eos": True, "temperature": 0.8}
                r = await http.post("/v1/chat/completions", json=body)
                tokens += r.json()["usage"]["completion_tokens"]

    start = time.time()
    await asyncio.gather(*(client() for _ in range(streams)))
    return tokens / (time.time() - start)


def wait_job(base, job_id, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = httpx.get(f"{base}/v1/train/status/{job_id}", timeout=30).json()
        if s["state"] in ("completed", "failed", "cancelled"):
            return s
        time.sleep(0.2)
    raise RuntimeError(s)


def time_to_correction(base: str) -> tuple[float, dict]:
    started = time.time()
    r = httpx.post(f"{base}/v1/train/sft", timeout=60, json={
        "adapter": "zorblatt", "examples": [{"messages": QUESTION + [{"role": "assistant", "content": CORRECTION}]}],
        "config": {"activate": True}})
    job_id = r.json()["job_id"]
    while True:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "default", "messages": QUESTION, "max_tokens": 16, "temperature": 0})
        if "Edda Brask" in r.json()["choices"][0]["message"]["content"]:
            return time.time() - started, wait_job(base, job_id)
        time.sleep(0.2)


def swap_latency(model_path: Path, swaps: int = 40) -> dict:
    """In process: 16 streams decode while adapter versions are published one after another."""
    from kiln_ray.adapters.store import AdapterStore
    from kiln_ray.config import EngineConfig
    from kiln_ray.engine.async_engine import AsyncLLMEngine, GenerateRequest
    from kiln_ray.engine.engine import LLMEngine
    from kiln_ray.engine.own_thread import run_in_own_thread
    from kiln_ray.engine.sampling_params import SamplingParams
    from kiln_ray.model.loader import load_model
    from kiln_ray.model.lora import DEFAULT_TARGETS, LoraWeights, lora_sites
    from kiln_ray.node import AdapterChoice, ServingNode
    from kiln_ray.training.service import Publication

    torch.set_num_threads(2)
    # Built on a thread that ends, as in the engine replica: no OpenMP pool outlives it beside
    # the step thread's (kiln_ray/engine/own_thread.py).
    model = run_in_own_thread(load_model, model_path, torch.bfloat16, "cpu")
    engine = AsyncLLMEngine(run_in_own_thread(LLMEngine, model, EngineConfig(num_kv_blocks=2048, max_loras=4,
                                                                                max_lora_rank=16)))
    home = Path(tempfile.mkdtemp())
    AdapterStore(home / "adapters")
    node = ServingNode(engine, AdapterStore(home / "adapters", read_only=True), home / "state", None)

    def random_versions():
        g = torch.Generator().manual_seed(0)
        return [LoraWeights(16, 32.0, {k: (torch.randn(16, s.in_features, generator=g) * 0.01,
                                           torch.randn(s.out_features, 16, generator=g) * 0.01)
                                       for k, s in lora_sites(model, DEFAULT_TARGETS).items()}) for _ in range(2)]

    versions = run_in_own_thread(random_versions)

    async def main():
        await node.start()
        stop = asyncio.Event()

        async def background(i):
            while not stop.is_set():
                req = GenerateRequest(f"bg{i}-{time.time()}", [1, 2, 3, 4, 5, 6, 7, 8],
                                      SamplingParams(max_tokens=64, ignore_eos=True))
                async for _ in node.generate(req, AdapterChoice("x") if i % 2 else AdapterChoice()):
                    pass

        await node.apply(Publication("x", 1, versions[0]))
        tasks = [asyncio.create_task(background(i)) for i in range(16)]
        await asyncio.sleep(2)
        flip, first = [], []
        for v in range(2, swaps + 2):
            t0 = time.perf_counter()
            await node.apply(Publication("x", v, versions[v % 2]))
            flip.append(time.perf_counter() - t0)
            req = GenerateRequest(f"probe{v}", [9, 10, 11], SamplingParams(max_tokens=1))
            async for _ in node.generate(req, AdapterChoice("x")):
                first.append(time.perf_counter() - t0)
                break
        stop.set()
        for t in tasks:
            t.cancel()
        return flip, first

    flip, first = asyncio.run(main())
    engine.shutdown()
    return {
        "swap_p50_ms": round(percentile(flip, 0.5) * 1e3, 1), "swap_p99_ms": round(percentile(flip, 0.99) * 1e3, 1),
        "publish_to_first_token_p50_ms": round(percentile(first, 0.5) * 1e3, 1),
        "publish_to_first_token_p99_ms": round(percentile(first, 0.99) * 1e3, 1),
        "swaps": len(flip), "background_streams": 16,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    cfg = KilnConfig()
    model_path = resolve_model_path(cfg.model, cfg.home)
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python bench/train_bench.py " + " ".join(sys.argv[1:])}
    tmp = Path(tempfile.mkdtemp(prefix="kiln-train-bench-"))

    print("swap latency (in process)...", flush=True)
    results["swap"] = swap_latency(model_path)
    print(results["swap"], flush=True)

    common = {"model": str(model_path), "engine": {"num_kv_blocks": 1024}}
    print("engine alone (training disabled)...", flush=True)
    with serve_run(write_config(tmp / "alone.yaml", PORT, {**common, "home": str(tmp / "home-alone"),
                                                            "training": {"enabled": False}}), PORT, tmp / "alone.log") as base:
        results["memory_engine_alone"] = httpx.get(f"{base}/health").json()["memory"]

    print("engine + trainer...", flush=True)
    with serve_run(write_config(tmp / "train.yaml", PORT, {**common, "home": str(tmp / "home")}), PORT, tmp / "train.log") as base:
        time.sleep(5)  # let the trainer finish its warm-up step
        results["memory_engine_and_trainer"] = httpx.get(f"{base}/health").json()["memory"]
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        idle = asyncio.run(stream_throughput(base, args.streams, args.seconds, model))
        r = httpx.post(f"{base}/v1/train/sft", timeout=60, json={
            "adapter": "long", "examples": [{"messages": QUESTION + [{"role": "assistant", "content": CORRECTION}]}],
            "config": {"steps": 400, "early_stop_loss": None}})
        job_id = r.json()["job_id"]
        while httpx.get(f"{base}/v1/train/status/{job_id}").json()["state"] != "running":
            time.sleep(0.2)
        busy = asyncio.run(stream_throughput(base, args.streams, args.seconds, model))
        long_status = httpx.get(f"{base}/v1/train/status/{job_id}").json()
        httpx.delete(f"{base}/v1/train/queue/{job_id}")
        wait_job(base, job_id)
        results["decode"] = {"streams": args.streams, "idle_tok_s": round(idle, 1), "while_training_tok_s": round(busy, 1),
                             "ratio": round(busy / idle, 3), "trainer_tokens_per_s_meanwhile": long_status["tokens_per_second"],
                             "trainer_steps_meanwhile": len(long_status["losses"])}
        seconds, status = time_to_correction(base)
        results["correction"] = {"seconds_to_first_corrected_answer": round(seconds, 1), "steps": len(status["losses"]),
                                 "trainer_tokens_per_s": status["tokens_per_second"],
                                 "seconds_per_step": round(status["train_seconds"] / max(len(status["losses"]), 1), 3)}
    (ROOT / "bench" / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
