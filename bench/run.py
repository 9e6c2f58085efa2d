"""Benchmark: kiln-ray's engine in process vs transformers `generate`, same model, same dtype,
same prompts, in one run.

    .venv/bin/python bench/run.py [--concurrency 1 32] [--prompt-tokens 128] [--new-tokens 128]
                                  [--repeats 3] [--dtype bfloat16] [--threads 2]

Writes bench/results.json (machine-readable, overwritten) and prints a table with
kiln-ray / transformers ratios. Each configuration runs once to warm up, then `--repeats`
times; the reported run is the median by throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiln_ray.config import EngineConfig, KilnConfig  # noqa: E402
from kiln_ray.engine.engine import LLMEngine  # noqa: E402
from kiln_ray.engine.sampling_params import SamplingParams  # noqa: E402
from kiln_ray.model.loader import load_model  # noqa: E402
from kiln_ray.model.registry import resolve_model_path  # noqa: E402


@dataclass
class Run:
    system: str
    model: str
    dtype: str
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def summarize(system, model_name, dtype, prompts, new_tokens, start, token_times, errors=0) -> Run:
    """token_times: per request, the wall time at which each of its tokens became available."""
    ttfts = [(t[0] - start) * 1e3 for t in token_times if t]
    itls = [(b - a) * 1e3 for t in token_times for a, b in zip(t, t[1:])]
    end = max(t[-1] for t in token_times if t)
    total = sum(len(t) for t in token_times)
    return Run(
        system=system,
        model=model_name,
        dtype=dtype,
        concurrency=len(prompts),
        prompt_tokens=len(prompts[0]),
        output_tokens=new_tokens,
        output_tok_s=round(total / (end - start), 2),
        ttft_p50_ms=round(percentile(ttfts, 0.5), 2),
        ttft_p99_ms=round(percentile(ttfts, 0.99), 2),
        itl_p50_ms=round(percentile(itls, 0.5), 2),
        itl_p99_ms=round(percentile(itls, 0.99), 2),
        errors=errors,
    )


def run_engine(engine: LLMEngine, prompts, new_tokens, model_name, dtype, tag) -> Run:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    times: dict[str, list[float]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            times[o.request_id].extend([now] * len(o.new_token_ids))
    return summarize("kiln-ray-engine", model_name, dtype, prompts, new_tokens, start, list(times.values()))


async def _http_stream(client, model, prompt_ids, new_tokens, start) -> list[float]:
    """One streaming completion over HTTP; the wall time of each token's arrival."""
    times: list[float] = []
    body = {"model": model, "prompt": prompt_ids, "max_tokens": new_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    # A chunk may carry several tokens; count its tokens from the logprob-free text
                    # by re-tokenising is costly, so the server's usage total is used at the end.
                    times.append(time.perf_counter())
    return times


def run_http(base: str, prompts, new_tokens, model_name, dtype) -> Run:
    """kiln-ray through `serve run`: HTTP + Ray, the product path (streaming completions)."""
    import asyncio

    import httpx

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=256)) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            start = time.perf_counter()
            results = await asyncio.gather(*(_http_stream(client, model, p, new_tokens, start) for p in prompts),
                                           return_exceptions=True)
            return start, results

    start, results = asyncio.run(main())
    errors = sum(1 for r in results if isinstance(r, BaseException))
    token_times = [r for r in results if not isinstance(r, BaseException)]
    # SSE chunks may coalesce tokens; spread each request's tokens over its chunk arrivals.
    spread = []
    for times in token_times:
        if not times:
            continue
        per_chunk = new_tokens / len(times)
        expanded, prev = [], start
        for t in times:
            k = max(1, round(per_chunk))
            expanded.extend(prev + (t - prev) * (j + 1) / k for j in range(k))
            prev = t
        spread.append(expanded[:new_tokens])
    run = summarize("kiln-ray", model_name, dtype, prompts, new_tokens, start, spread, errors)
    return run


def run_transformers(hf_model, prompts, new_tokens, model_name, dtype, pad_id) -> Run:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    # Same-length prompts: no padding needed (left padding would be a no-op).
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    end = time.perf_counter()
    # A token is available when the step after its logits finishes; the last at `end`.
    step_done = clock.times[1:] + [end]
    token_times = [list(step_done) for _ in prompts]
    return summarize("transformers", model_name, dtype, prompts, new_tokens, start, token_times)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.output_tok_s)[len(runs) // 2]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--http", action="store_true", help="also measure kiln-ray through serve run (HTTP + Ray)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    cfg = KilnConfig(model=args.model)
    path = resolve_model_path(cfg.model, cfg.home)
    model_name = Path(path).name
    runs: list[Run] = []

    engine = LLMEngine(
        load_model(path, dtype, "cpu"),
        EngineConfig(max_num_seqs=max(args.concurrency), kv_cache_bytes=2 << 30),
    )
    vocab = engine.model.config.vocab_size
    total = len(args.concurrency) * (args.repeats + 1) * (1 if args.skip_transformers else 3)
    bar = tqdm(total=total, desc="bench", unit="run")
    for conc in args.concurrency:
        results = []
        for rep in range(args.repeats + 1):
            # Prompts differ per repetition so the prefix cache never turns prefill into a hit.
            ps = make_prompts(conc, args.prompt_tokens, vocab, seed=1000 * rep + conc)
            r = run_engine(engine, ps, args.new_tokens, model_name, args.dtype, f"c{conc}r{rep}")
            if rep:
                results.append(r)
            bar.update()
        runs.append(median_run(results))
    del engine

    if args.http:
        import tempfile

        from tests.e2e.serve_process import serve_run, write_config

        tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
        config = write_config(tmp / "serve.yaml", 8792, {
            "model": str(path), "home": str(tmp / "home"), "dtype": args.dtype, "training": {"enabled": False},
            "engine": {"max_num_seqs": max(args.concurrency), "kv_cache_bytes": 2 << 30}})
        with serve_run(config, 8792, tmp / "serve.log") as base:
            for conc in args.concurrency:
                results = []
                for rep in range(args.repeats + 1):
                    ps = make_prompts(conc, args.prompt_tokens, vocab, seed=1000 * rep + conc)
                    r = run_http(base, ps, args.new_tokens, model_name, args.dtype)
                    if rep:
                        results.append(r)
                runs.append(median_run(results))

    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        # transformers gets its best attention implementation per concurrency (on this CPU,
        # sdpa is faster for one stream, eager for batches: sdpa's masked CPU path is slow).
        for conc in args.concurrency:
            best = None
            for impl in ("sdpa", "eager"):
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).eval()
                pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0
                results = []
                for rep in range(args.repeats + 1):
                    ps = make_prompts(conc, args.prompt_tokens, vocab, seed=1000 * rep + conc)
                    r = run_transformers(hf, ps, args.new_tokens, model_name, args.dtype, pad)
                    if rep:
                        results.append(r)
                    bar.update()
                run = median_run(results)
                if best is None or run.output_tok_s > best.output_tok_s:
                    best = run
            runs.append(best)
    bar.close()

    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command.strip(),
        "runs": [asdict(r) for r in runs],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(runs)
    return 0


def print_table(runs: list[Run]) -> None:
    head = f"{'system':<16} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    print("\n" + head)
    print("-" * len(head))
    for r in runs:
        print(
            f"{r.system:<16} {r.concurrency:>4} {r.output_tok_s:>8.1f} {r.ttft_p50_ms:>9.1f} "
            f"{r.ttft_p99_ms:>9.1f} {r.itl_p50_ms:>8.1f} {r.itl_p99_ms:>8.1f}"
        )
    base = {r.concurrency: r for r in runs if r.system == "transformers"}
    engine = {r.concurrency: r for r in runs if r.system == "kiln-ray-engine"}
    for r in runs:
        if r.system == "kiln-ray" and r.concurrency in engine:
            print(f"concurrency {r.concurrency}: HTTP + Ray / in-process engine throughput "
                  f"x{r.output_tok_s / engine[r.concurrency].output_tok_s:.2f}")
        if r.system == "kiln-ray-engine" and r.concurrency in base:
            b = base[r.concurrency]
            print(
                f"concurrency {r.concurrency}: kiln-ray/transformers throughput x{r.output_tok_s / b.output_tok_s:.2f}, "
                f"ITL p50 x{r.itl_p50_ms / b.itl_p50_ms:.2f}, TTFT p50 x{r.ttft_p50_ms / b.ttft_p50_ms:.2f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
