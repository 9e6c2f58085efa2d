"""Run `serve run <config>` as a subprocess and wait until the app answers /health
(used by the e2e tests and by bench/); redeploy a changed config onto the running cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, port: int, args_update: dict) -> Path:
    """serve_config.yaml with another port and some args replaced (nested dicts merged)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    for key, value in args_update.items():
        if isinstance(value, dict):
            args.setdefault(key, {}).update(value)
        else:
            args[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def serve_run(config: Path, port: int, log_path: Path, timeout: float = 240.0, env: dict | None = None,
              address: str | None = None):
    """Yield the base URL once /health answers 200; stop the app (and the local Ray cluster
    it started, unless it joined the cluster at `address`) on exit."""
    base = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    # RAY_ADDRESS=local: a fresh local cluster, never one some `ray start` left on this machine.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address or "local",
           **(env or {})}
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "serve"), "run", str(config)], cwd=config.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited ({proc.returncode}); see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"the app did not become healthy in {timeout:.0f} s; see {log_path}")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run tears down the local cluster it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run([str(bin_dir / "ray"), "stop", "--force"], capture_output=True)
        log.close()


def redeploy(config: Path, address: str, base: str, env: dict | None = None, timeout: float = 300.0) -> None:
    """Deploy a changed `config` onto the running cluster at `address` with `serve run
    --non-blocking` (which submits it and exits, leaving the app running). Serve replaces the
    replicas whose args changed; return once /health answers from a new engine replica."""
    old = httpx.get(f"{base}/health", timeout=30).json()["replica"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    serve = str(Path(sys.executable).parent / "serve")
    subprocess.run([serve, "run", "--non-blocking", f"--address={address}", str(config)], cwd=config.parent,
                   env=env, check=True, capture_output=True, timeout=120)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=10)
            if r.status_code == 200 and r.json()["replica"] != old:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no new engine replica answered in {timeout:.0f} s after redeploying {config}")
