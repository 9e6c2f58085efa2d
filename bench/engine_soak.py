"""The engine alone under churn, for minutes: does its memory grow?

    .venv/bin/python bench/engine_soak.py --minutes 9

Keeps ~96 requests (random prompts of 15-90 tokens, 8-40 sampled tokens, a third with
logprobs) in an in-process LLMEngine on the default model (bf16), and prints every 15 s the
RSS, the number of live Python objects and of allocated blocks. Halfway, and at the end,
glibc's malloc_trim shows how much of the RSS is freed memory the allocator kept. The load
drill (tests/e2e/test_load.py) measures the whole served path for one minute; this separates
the engine from Ray and the ingress, over a longer run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln_ray.config import EngineConfig, KilnConfig  # noqa: E402
from kiln_ray.engine.engine import LLMEngine  # noqa: E402
from kiln_ray.engine.sampling_params import SamplingParams  # noqa: E402
from kiln_ray.model.default_model import ensure_default_model  # noqa: E402
from kiln_ray.model.loader import load_model  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--in-flight", type=int, default=96)
    args = parser.parse_args()
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    path = ensure_default_model(Path(KilnConfig().home))
    engine = LLMEngine(load_model(path, torch.bfloat16, "cpu"), EngineConfig(max_num_seqs=64, kv_cache_bytes=512 << 20))
    rng = random.Random(0)
    added = finished = 0
    start = last = time.monotonic()
    trimmed = False
    while (now := time.monotonic()) - start < args.minutes * 60:
        while len(engine.requests) < args.in_flight:
            added += 1
            prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(15, 90))]
            params = SamplingParams(max_tokens=rng.randrange(8, 40), temperature=0.7, seed=added,
                                    logprobs=2 if added % 3 == 0 else None)
            engine.add_request(f"r{added}", prompt, params)
        finished += sum(1 for out in engine.step() if out.finish_reason is not None)
        if now - last >= 15:
            last = now
            print(f"{now - start:5.0f} s  RSS {rss_mib():7.1f} MiB  finished {finished:6d}  "
                  f"objects {len(gc.get_objects()):7d}  blocks {sys.getallocatedblocks():8d}", flush=True)
        if not trimmed and now - start > args.minutes * 30:
            trimmed, before = True, rss_mib()
            trim(0)
            print(f"malloc_trim halfway: {before:.1f} -> {rss_mib():.1f} MiB", flush=True)
    before = rss_mib()
    trim(0)
    print(f"malloc_trim at the end: {before:.1f} -> {rss_mib():.1f} MiB; {finished} requests finished")


if __name__ == "__main__":
    main()
