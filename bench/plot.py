"""Plot output tok/s against concurrency, one line per system, one panel per prompt length.

    bench/.env/bin/python bench/plot.py [bench/results.json] [bench/throughput.png]

Runs in bench/.env (matplotlib; bench/install_peers.sh), not in the project's venv;
bench/run.py calls it at the end of a run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
STYLE = {  # system -> (colour, marker)
    "kiln-ray": ("tab:red", "o"),
    "kiln-ray-engine": ("tab:orange", "s"),
    "vllm": ("tab:blue", "^"),
    "llama.cpp": ("tab:green", "D"),
    "transformers": ("tab:gray", "v"),
}


def plot(results_path: Path, png_path: Path) -> None:
    report = json.loads(results_path.read_text())
    runs = report["runs"]
    prompt_lengths = sorted({r["prompt_tokens"] for r in runs})
    fig, axes = plt.subplots(1, len(prompt_lengths), figsize=(6 * len(prompt_lengths), 4.5), squeeze=False)
    for ax, prompt in zip(axes[0], prompt_lengths):
        for system, (colour, marker) in STYLE.items():
            points = sorted((r["concurrency"], r["output_tok_s"]) for r in runs
                            if r["system"] == system and r["prompt_tokens"] == prompt)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colour, marker=marker, label=system)
        concurrencies = sorted({r["concurrency"] for r in runs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{prompt}-token prompts, {runs[0]['output_tokens']} new tokens")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{runs[0]['model']} {runs[0]['dtype']} - {report['machine']}\n{report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "results.json"
    png = Path(sys.argv[2]) if len(sys.argv) > 2 else BENCH / "throughput.png"
    plot(results, png)
    print(f"plot: {png}")
