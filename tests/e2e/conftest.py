"""ONE real Ray Serve instance for the whole e2e session: `serve run` on a copy of
serve_config.yaml (the product path), on its own port, with the real default model.

Limits are lowered so that overload is reachable: 8 sequences run at once and 24 may wait
(a batch-completions call of 4 prompts x 6 fits; 40 concurrent requests do not).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("KILN_E2E_PORT", "8765"))
BASE = f"http://127.0.0.1:{PORT}"


def e2e_config(tmp: Path, model_dir: Path) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = PORT
    args = config["applications"][0]["args"]
    args["model"] = str(model_dir)  # the converted default model, so the fresh home needs no conversion
    args["home"] = str(tmp / "home")  # adapters and state of this session only
    args["engine"].update({"max_num_seqs": 8, "max_waiting_requests": 24, "num_kv_blocks": 2048})
    path = tmp / "serve_config.e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    log = open(tmp / "serve.log", "w")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    serve_bin = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen([str(serve_bin), "run", str(e2e_config(tmp, default_model_dir))], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited ({proc.returncode}); see {tmp / 'serve.log'}")
            try:
                if httpx.get(f"{BASE}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"the app did not become healthy in 240 s; see {tmp / 'serve.log'}")
        yield BASE
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run tears down the local cluster it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        log.close()


@pytest.fixture(scope="session")
def client(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(client) -> str:
    return client.models.list().data[0].id
