"""The `kiln-ray` console script.

    kiln-ray fetch-model [--home DIR] [--force]   convert the embedded default model once
    kiln-ray info [--home DIR]                    versions, torch build, default model state

The home directory is `--home`, else $KILN_HOME, else ~/.cache/kiln-ray. torch and transformers
are imported inside the subcommands that need them, so `--help` and a `fetch-model` that finds
the model already converted stay fast.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import kiln_ray
from kiln_ray import __version__


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = _parser().parse_args(argv)
    home = _resolve_home(args.home)
    try:
        return args.run(args, home)
    except FileNotFoundError as error:  # e.g. the default model's wheel is not installed
        print(f"kiln-ray: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln-ray", description=kiln_ray.__doc__)
    parser.add_argument("--version", action="version", version=f"kiln-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    home_help = "kiln home directory (default: $KILN_HOME, else ~/.cache/kiln-ray)"

    fetch = commands.add_parser("fetch-model", help="convert the embedded default model into the home directory")
    fetch.add_argument("--home", type=Path, default=None, help=home_help)
    fetch.add_argument("--force", action="store_true", help="convert again even if already present")
    fetch.set_defaults(run=_fetch_model)

    info = commands.add_parser("info", help="print versions, the torch build and the default model's state")
    info.add_argument("--home", type=Path, default=None, help=home_help)
    info.set_defaults(run=_info)
    return parser


def _resolve_home(flag: Path | None) -> Path:
    if flag is not None:
        return flag.expanduser()
    env = os.environ.get("KILN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln-ray"


def _fetch_model(args: argparse.Namespace, home: Path) -> int:
    from kiln_ray.model.default_model import ensure_default_model

    model_dir = ensure_default_model(home, progress=sys.stderr.isatty(), force=args.force)
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    print(f"{model_dir}  ({size / 2**20:.1f} MiB)")
    return 0


def _info(args: argparse.Namespace, home: Path) -> int:
    import torch

    from kiln_ray.model.default_model import default_gguf_path, default_model_dir, is_complete

    model_dir = default_model_dir(home)
    try:
        gguf = str(default_gguf_path())
    except FileNotFoundError as error:
        gguf = f"missing ({error})"
    cuda_build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    home_source = "--home" if args.home is not None else "KILN_HOME" if os.environ.get("KILN_HOME") else "default"
    rows = [
        ("kiln-ray", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("torch cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("cuda available", f"{torch.cuda.is_available()} ({cuda_build})"),
        ("ray", _dist_version("ray")),
        ("transformers", _dist_version("transformers")),
        ("kiln home", f"{home} (from {home_source})"),
        ("KILN_HOME", os.environ.get("KILN_HOME", "unset")),
        ("default model", str(model_dir)),
        ("default model fetched", "yes" if is_complete(model_dir) else "no (run: kiln-ray fetch-model)"),
        ("default model gguf", gguf),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _dist_version(name: str) -> str:
    """Version of an installed distribution, read without importing it (importing ray is slow)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
