"""Benchmark: kiln-ray and its peers side by side in one run, same model, same dtype, same
prompts, greedy, exactly `--new-tokens` output tokens per request.

Systems (`--systems`, default all, run in this order, one at a time):
  kiln-ray-engine  kiln-ray's LLMEngine stepped in this process
  kiln-ray         the product path: `serve run serve_config.yaml`, streaming over HTTP
  vllm             vLLM's CPU build, its OpenAI server (bench/.peers/vllm)
  llama.cpp        llama-cpp-python's server on a bf16 GGUF; one request at a time, so
                   concurrency 1 only (bench/.peers/llama)
  transformers     `generate` in this process, sdpa attention at 1 stream, eager above
                   (`--transformers-attn`)

    make bench                        # installs the peers (bench/install_peers.sh), full run
                                      # (~22 min on the quiet 2-core dev machine), then the
                                      # Qwen3.5 hybrid run below
    .venv/bin/python bench/run.py --model qwen3_5-hybrid --systems kiln-ray-engine,kiln-ray,vllm
    .venv/bin/python bench/run.py --systems vllm --concurrency 1,8 --prompt-tokens 128 --reps 1

Each (system, prompt length, concurrency) runs one short warm-up wave (`--warmup-tokens` new
tokens) and then `--reps` waves of `concurrency` requests sent at once; the reported run is
the median by throughput. The HTTP servers are driven by one load generator (bench/loadgen.py)
and are started, measured and stopped in turn. Writes bench/results.json (overwritten),
bench/throughput.png, and prints the table with kiln-ray / peer ratios last.

`--model qwen3_5-hybrid` measures a Qwen3.5 gated-delta-net hybrid of SmolLM2's size with
random weights (bench/hybrid_model.py builds it once) and writes bench/results-hybrid.json
and bench/throughput-hybrid.png instead. llama.cpp is not run on it (no GGUF of the hybrid
is built); `make bench` runs kiln-ray and vLLM on it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import hybrid_model  # noqa: E402
import servers  # noqa: E402
from inprocess import run_engine, run_transformers  # noqa: E402
from loadgen import LoadGenerator  # noqa: E402
from prompts import PromptBuilder  # noqa: E402
from results import SYSTEMS, Run, format_table, machine, median_run, write_report  # noqa: E402


HYBRID = "qwen3_5-hybrid"


def csv_list(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.replace(" ", ",").split(",") if x]
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", type=csv_list(str), default=list(SYSTEMS), help="comma-separated, of: " + ", ".join(SYSTEMS))
    ap.add_argument("--concurrency", type=csv_list(int), default=[1, 8, 32, 64])
    ap.add_argument("--prompt-tokens", type=csv_list(int), default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", "--repeats", type=int, default=2, help="measured waves per configuration")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the warm-up wave")
    ap.add_argument("--model", default="default",
                    help=f"a kiln-ray model spec (default: the embedded default), or {HYBRID!r}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process systems")
    ap.add_argument("--llama-threads", type=int, nargs="+", default=[2],
                    help="llama.cpp n_threads; several: each is run, the best kept per configuration")
    ap.add_argument("--transformers-attn", default="auto", choices=["auto", "best", "sdpa", "eager"],
                    help="auto: sdpa at concurrency 1, eager above (what best picked on the dev machine); "
                         "best: run sdpa and eager, keep the faster per configuration (twice the time)")
    ap.add_argument("--transformers-reps", type=int, default=1,
                    help="measured waves per configuration for transformers, the slowest system")
    ap.add_argument("--vllm-threads-bind", nargs="+", default=["0-1"],
                    help="VLLM_CPU_OMP_THREADS_BIND; several: each is run, the best kept per configuration "
                         "(auto: 1 OpenMP thread, 1 core kept for its front end; 0-1: both cores; nobind)")
    ap.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--out", type=Path, help="default bench/results.json (results-hybrid.json for the hybrid)")
    ap.add_argument("--plot", type=Path, help="default bench/throughput.png (throughput-hybrid.png)")
    args = ap.parse_args(argv)
    suffix = "-hybrid" if args.model == HYBRID else ""
    args.out = args.out or BENCH / f"results{suffix}.json"
    args.plot = args.plot or BENCH / f"throughput{suffix}.png"
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    return args


class Bench:
    """One invocation: the model, the prompts, the configurations, the progress bar."""

    def __init__(self, args, model_dir: Path, tokenizer):
        self.args = args
        self.model_dir = model_dir
        self.model_name = model_dir.name
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer)
        self.configs = [(p, c) for p in args.prompt_tokens for c in sorted(args.concurrency)]
        self.bar = tqdm(total=0, desc="bench", unit="wave")

    def prompt_set(self, prompt_tokens: int, concurrency: int, rep: int):
        """rep 0 is the warm-up; every wave's prompts differ, so no prefix cache hits."""
        return self.prompts.build(concurrency, prompt_tokens, seed=prompt_tokens * 100_000 + concurrency * 100 + rep)

    def repeat(self, measure, configs, reps: int | None = None) -> list[Run]:
        """measure(prompts, new_tokens) -> Run, over the configs: warm-up + median of `reps`
        (default --reps) waves."""
        reps = reps or self.args.reps
        runs = []
        self.bar.total += len(configs) * (1 + reps)
        self.bar.refresh()
        for prompt_tokens, conc in configs:
            measure(self.prompt_set(prompt_tokens, conc, 0), self.args.warmup_tokens)
            self.bar.update()
            measured = []
            for rep in range(1, reps + 1):
                measured.append(measure(self.prompt_set(prompt_tokens, conc, rep), self.args.new_tokens))
                self.bar.update()
            runs.append(median_run(measured))
        return runs

    def engine(self) -> list[Run]:
        from kiln_ray.config import EngineConfig
        from kiln_ray.engine.engine import LLMEngine
        from kiln_ray.model.loader import load_model

        engine = LLMEngine(load_model(self.model_dir, getattr(torch, self.args.dtype), "cpu"),
                           EngineConfig(max_num_seqs=max(self.args.concurrency), kv_cache_bytes=2 << 30))
        counter = iter(range(10**9))
        return self.repeat(lambda ps, n: run_engine(engine, ps, n, self.model_name, self.args.dtype,
                                                    f"w{next(counter)}"), self.configs)

    def transformers(self) -> list[Run]:
        from transformers import AutoModelForCausalLM

        choice = self.args.transformers_attn
        variants = []
        for impl in ("sdpa", "eager"):
            configs = [(p, c) for p, c in self.configs
                       if choice in ("best", impl) or (choice == "auto" and (c == 1) == (impl == "sdpa"))]
            if not configs:
                continue
            hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.args.dtype),
                                                      attn_implementation=impl).eval()
            pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0
            variants.append((f"attn={impl}", self.repeat(
                lambda ps, n: run_transformers(hf, ps, n, self.model_name, self.args.dtype, pad), configs,
                self.args.transformers_reps)))
            del hf
        return best_per_config(variants)

    def http(self, system: str) -> list[Run]:
        """Each of the system's server variants started, measured and stopped in turn; the best
        variant per configuration is kept."""
        variants = self.make_servers(system)
        return best_per_config([(name, self.server(server, f"{system}-{i}" if len(variants) > 1 else system))
                                for i, (name, server) in enumerate(variants)])

    def server(self, server: servers.Server, log_name: str) -> list[Run]:
        tqdm.write("   " + "; ".join(f"{k}={v}" for k, v in server.settings.items()))
        configs = [(p, c) for p, c in self.configs if server.serves(c)]
        if not configs:
            return []
        servers.CACHE.mkdir(parents=True, exist_ok=True)
        log = servers.CACHE / f"{log_name}.log"
        t0 = time.perf_counter()
        # One event loop (and connection pool) for all of this server's waves.
        with server.running(log) as endpoint, asyncio.Runner() as loop:
            tqdm.write(f"   ready in {time.perf_counter() - t0:.0f} s ({endpoint.base_url}, model {endpoint.model!r}, log {log})")
            gen = LoadGenerator(endpoint, self._count_tokens, max(c for _, c in configs))
            try:
                self._check_prompt_length(loop, gen)
                return self.repeat(lambda ps, n: loop.run(gen.measure(ps, n, self.model_name, self.args.dtype)),
                                   configs)
            finally:
                loop.run(gen.aclose())

    def _check_prompt_length(self, loop: asyncio.Runner, gen: LoadGenerator) -> None:
        """The server must see the prompt as exactly the tokens we count (no added BOS, a
        faithful tokenizer); it is reported when it tells its usage."""
        for length in self.args.prompt_tokens:
            seen = loop.run(gen.prompt_tokens(self.prompt_set(length, 1, 0)[0]))
            if seen is not None and seen != length:
                tqdm.write(f"   WARNING: a {length}-token prompt is {seen} tokens to {gen.endpoint.system}")

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def make_servers(self, system: str) -> list[tuple[str, servers.Server]]:
        a = self.args
        if system == "kiln-ray":
            return [("", servers.kiln_ray(self.model_dir, a.dtype, max(a.concurrency)))]
        if system == "vllm":
            return [(f"VLLM_CPU_OMP_THREADS_BIND={bind}",
                     servers.vllm(self.model_dir, a.dtype, max(a.concurrency), bind, a.vllm_kv_gib))
                    for bind in a.vllm_threads_bind]
        gguf = servers.PEERS / "models" / f"{self.model_name}-bf16.gguf"
        if not gguf.exists():
            raise FileNotFoundError(f"{gguf} missing: run bench/install_peers.sh")
        return [(f"n_threads={n}", servers.llama_cpp(gguf, n, sorted(set(self.tokenizer.all_special_ids))))
                for n in a.llama_threads]


def best_per_config(variants: list[tuple[str, list[Run]]]) -> list[Run]:
    """The fastest variant's run per (prompt length, concurrency); says which won when there
    was a choice."""
    best: dict[tuple[int, int], tuple[str, Run]] = {}
    for name, runs in variants:
        for run in runs:
            key = (run.prompt_tokens, run.concurrency)
            if key not in best or run.output_tok_s > best[key][1].output_tok_s:
                best[key] = (name, run)
    if len(variants) > 1:
        for (prompt, conc), (name, run) in sorted(best.items()):
            tqdm.write(f"   prompt {prompt}, concurrency {conc}: kept {name} ({run.output_tok_s:.1f} tok/s)")
    return [run for _, run in best.values()]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from kiln_ray.config import KilnConfig
    from kiln_ray.model.registry import resolve_model_path
    from transformers import AutoTokenizer

    if args.model == HYBRID:
        model_dir = hybrid_model.build()
    else:
        cfg = KilnConfig(model=args.model)
        model_dir = Path(resolve_model_path(cfg.model, cfg.home))
    bench = Bench(args, model_dir, AutoTokenizer.from_pretrained(model_dir))

    runs: list[Run] = []
    for system in SYSTEMS:
        if system not in args.systems:
            continue
        tqdm.write(f"== {system}")
        if system == "llama.cpp" and args.model == HYBRID:
            tqdm.write("   not run: no GGUF of the random-weight hybrid is built")
            continue
        t0 = time.perf_counter()
        if system == "kiln-ray-engine":
            runs += bench.engine()
        elif system == "transformers":
            runs += bench.transformers()
        else:
            runs += bench.http(system)
        tqdm.write(f"   {system} done in {time.perf_counter() - t0:.0f} s")
    bench.bar.close()

    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine_desc = machine(torch.get_num_threads(), torch.__version__, torch.backends.cpu.get_cpu_capability())
    write_report(args.out, machine_desc, command.strip(), runs)
    plot(args.out, args.plot)
    print(format_table(runs))
    return 0


def plot(results: Path, png: Path) -> None:
    """bench/plot.py in bench/.env (matplotlib lives there, not in the project's venv)."""
    python = BENCH / ".env" / "bin" / "python"
    if not python.exists():
        print(f"no plot: {python} missing (run bench/install_peers.sh)")
        return
    done = subprocess.run([str(python), str(BENCH / "plot.py"), str(results), str(png)], capture_output=True, text=True)
    print(done.stdout.strip() if done.returncode == 0 else f"plot failed: {done.stderr.strip()[-500:]}")


if __name__ == "__main__":
    raise SystemExit(main())
