"""Micro-benchmark of the bf16 projections of SmolLM2-135M on CPU (kernels/linear.py):

    PYTHONPATH=. .venv/bin/python bench/linear_bench.py [--threads 2] [--rounds 3] [--tokens 1 8 32 64 512]

For every projection shape and token count it times F.linear on the plain weight, oneDNN on a
packed copy (`packed_linear`) and the AMX kernel on the plain weight (`amx_linear`), in two
settings:

- hot: the same weight every call, so it sits in L2 (what a micro-benchmark usually shows);
- streaming: each call takes the next of 30 distinct copies of the weight (one per layer), so
  weights come from L3 / DRAM as they do in the model, where 30 layers are 270 MB.

The paths run interleaved in bursts of a few milliseconds (`--rounds` x `--budget` seconds per
path), so the drift of a shared machine hits them all alike; each cell is the median
(or `--stat p10`) microseconds of one call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.linear import amx_available, amx_linear, pack_weight, packed_linear  # noqa: E402

# name: (out_features N, in_features K, bias); SmolLM2-135M: hidden 576, MLP 1536, 30 layers.
SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "head": (49152, 576),
}
LAYERS = 30
STATS = {"median": statistics.median, "p10": lambda s: sorted(s)[len(s) // 10]}


def time_burst(call, weights, x, calls: int, clock) -> list[float]:
    """Microseconds of each of `calls` calls, cycling through `weights` (the first, which warms
    up what a burst needs, is not counted)."""
    out = []
    for c in range(calls + 1):
        w = weights[c % len(weights)]
        start = clock()
        call(x, w)
        out.append((clock() - start) * 1e6)
    return out[1:]


def bench_shape(
    n: int, k: int, tokens: int, copies: int, rounds: int, budget_s: float, clock, stat
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    plain = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for _ in range(copies)]
    packed = [pack_weight(w) for w in plain]
    x = torch.randn(tokens, k, generator=g).bfloat16()
    paths = {
        "F.linear": (lambda x, w: F.linear(x, w), plain),
        "oneDNN packed": (lambda x, w: packed_linear(x, w, None), packed),
        "AMX plain": (lambda x, w: amx_linear(x, w, None), plain),
    }
    start = time.perf_counter()
    packed_linear(x, packed[0], None)
    per_call = max(time.perf_counter() - start, 1e-5)
    # bursts of a few ms, so that the paths interleave finely on a drifting machine
    calls = max(copies, min(200, int(0.005 / per_call)))
    bursts = max(1, int(budget_s / (per_call * calls)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds * bursts):
        for name in names[r % 3:] + names[: r % 3]:  # rotate who goes first
            call, weights = paths[name]
            samples[name] += time_burst(call, weights, x, calls, clock)
    return {name: stat(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 512])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budget", type=float, default=0.2, help="seconds per path per round")
    ap.add_argument("--settings", nargs="+", default=["hot", "streaming"], choices=["hot", "streaming"])
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="cpu: the calling thread's CPU time, immune to other tenants' preemption (use with --threads 1)",
    )
    ap.add_argument(
        "--stat", default="median", choices=list(STATS),
        help="p10: the 10th percentile, the calls no other tenant disturbed on an oversubscribed machine",
    )
    args = ap.parse_args()
    if not amx_available(torch.device("cpu"), torch.bfloat16):
        sys.exit("the AMX kernel is not available on this machine")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"threads {args.threads}, rounds {args.rounds}, {args.clock} clock; {args.stat} us per call (x: oneDNN / AMX)")
    with torch.no_grad():
        for setting in args.settings:
            print(f"\n## {setting}")
            print(f"{'shape':>8} {'N':>6} {'K':>5} {'T':>4} | {'F.linear':>9} {'oneDNN':>9} {'AMX':>9} | {'AMX x':>6}")
            for name in args.shapes:
                n, k = SHAPES[name]
                # the head is one matrix in the model: "streaming" it is 56 MB from DRAM already
                copies = 1 if setting == "hot" or name == "head" else LAYERS
                for tokens in args.tokens:
                    r = bench_shape(n, k, tokens, copies, args.rounds, args.budget, clock, STATS[args.stat])
                    f, p, a = r["F.linear"], r["oneDNN packed"], r["AMX plain"]
                    print(f"{name:>8} {n:>6} {k:>5} {tokens:>4} | {f:9.1f} {p:9.1f} {a:9.1f} | {p / a:6.2f}", flush=True)


if __name__ == "__main__":
    main()
