"""One measured configuration (`Run`), how it is summarised from token arrival times, and the
report: bench/results.json and the table printed at the end of a run."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

# The run order: the in-process engine first (no server running), transformers last.
SYSTEMS = ("kiln-ray-engine", "kiln-ray", "vllm", "llama.cpp", "transformers")

# (numerator, denominator) pairs of the ratio table: the product path against each HTTP peer,
# the engine against transformers (both in process), and what HTTP + Ray costs the engine.
RATIOS = (
    ("kiln-ray", "vllm"),
    ("kiln-ray", "llama.cpp"),
    ("kiln-ray-engine", "transformers"),
    ("kiln-ray", "kiln-ray-engine"),
)


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


def summarize(system: str, model: str, dtype: str, concurrency: int, prompt_tokens: int, output_tokens: int,
              start: float, token_times: list[list[float]], errors: int = 0) -> Run:
    """token_times: per successful request, the wall time at which each of its tokens became
    available (perf_counter seconds; `start` is when the requests were sent). Throughput is all
    tokens over the time from `start` to the last token."""
    token_times = [t for t in token_times if t]
    ttfts = [(t[0] - start) * 1e3 for t in token_times]
    itls = [(b - a) * 1e3 for t in token_times for a, b in zip(t, t[1:])]
    total = sum(len(t) for t in token_times)
    elapsed = max(t[-1] for t in token_times) - start if token_times else float("nan")
    return Run(
        system=system,
        model=model,
        dtype=dtype,
        concurrency=concurrency,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_tok_s=round(total / elapsed, 2) if token_times else 0.0,
        ttft_p50_ms=round(percentile(ttfts, 0.5), 2),
        ttft_p99_ms=round(percentile(ttfts, 0.99), 2),
        itl_p50_ms=round(percentile(itls, 0.5), 2),
        itl_p99_ms=round(percentile(itls, 0.99), 2),
        errors=errors,
    )


def median_run(runs: list[Run]) -> Run:
    """The repetition with the median throughput; its errors become the sum over all of them."""
    median = sorted(runs, key=lambda r: r.output_tok_s)[len(runs) // 2]
    return Run(**{**asdict(median), "errors": sum(r.errors for r in runs)})


def machine(torch_threads: int, torch_version: str, capability: str) -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch_threads} threads, torch {torch_version}, {capability}"


def source_commit() -> str | None:
    """The checkout measured: `git describe`-like "<sha>" or "<sha>+dirty" (uncommitted
    changes), None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def write_report(path: Path, machine_desc: str, command: str, runs: list[Run]) -> None:
    """Overwrite `path` with the run's JSON (schema: date, machine, command, commit, runs[])."""
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_desc,
        "command": command,
        "commit": source_commit(),
        "runs": [asdict(r) for r in runs],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


def format_table(runs: list[Run]) -> str:
    """All runs, then the kiln-ray / peer ratios at each (prompt length, concurrency) that both
    sides measured."""
    head = (f"{'system':<16} {'prompt':>6} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}")
    lines = ["", head, "-" * len(head)]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    runs = sorted(runs, key=lambda r: (r.prompt_tokens, order.get(r.system, len(SYSTEMS)), r.concurrency))
    for r in runs:
        lines.append(f"{r.system:<16} {r.prompt_tokens:>6} {r.concurrency:>4} {r.output_tok_s:>8.1f} "
                     f"{r.ttft_p50_ms:>9.1f} {r.ttft_p99_ms:>9.1f} {r.itl_p50_ms:>8.1f} {r.itl_p99_ms:>8.1f} "
                     f"{r.errors:>6}")
    by_key = {(r.system, r.prompt_tokens, r.concurrency): r for r in runs}
    ratio_lines = []
    for num, den in RATIOS:
        for (system, prompt, conc), a in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            b = by_key.get((den, prompt, conc))
            if system != num or b is None or not b.output_tok_s:
                continue
            ratio_lines.append(
                f"{num + ' / ' + den:<34} {prompt:>6} {conc:>4}   tok/s x{a.output_tok_s / b.output_tok_s:.2f}   "
                f"TTFT p50 x{_ratio(a.ttft_p50_ms, b.ttft_p50_ms)}   ITL p50 x{_ratio(a.itl_p50_ms, b.itl_p50_ms)}")
    if ratio_lines:
        lines += ["", f"{'ratio':<34} {'prompt':>6} {'conc':>4}", *ratio_lines]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b == b and a == a else "n/a"
