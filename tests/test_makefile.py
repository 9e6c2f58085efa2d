"""`make setup` installs torch from TORCH_SPEC again exactly when the spec changes, and does
nothing on a re-run. Run against a stand-in `python3` that records what it is asked to do."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Logs every call, one line of |-separated arguments; `-m venv DIR` creates DIR/bin/python as
# a copy of itself.
STUB_PYTHON = """#!/bin/sh
(IFS='|'; echo "$*") >> "$STUB_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


@pytest.fixture
def setup_run(tmp_path):
    """Run `make setup` with a given TORCH_SPEC; returns the stand-in's calls of that run."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"

    def run(torch_spec: str) -> list[list[str]]:
        log.write_text("")
        subprocess.run(
            ["make", "-s", "-C", str(REPO), "setup", f"VENV={venv}", f"PYTHON={stub}", f"TORCH_SPEC={torch_spec}"],
            check=True, env={**os.environ, "STUB_LOG": str(log)}, capture_output=True,
        )
        return [line.split("|") for line in log.read_text().splitlines()]

    return run


PIP_INSTALL = ["-m", "pip", "--disable-pip-version-check", "install", "-q"]


def torch_installs(calls: list[list[str]]) -> list[list[str]]:
    """The arguments after `pip install -q` of each torch install among the calls."""
    return [c[len(PIP_INSTALL):] for c in calls if c[: len(PIP_INSTALL)] == PIP_INSTALL and "torch" in c[5]]


def installs_project(calls: list[list[str]]) -> bool:
    return PIP_INSTALL + ["-e", ".[test]"] in calls


def test_a_changed_torch_spec_reinstalls_torch_and_an_unchanged_one_does_nothing(setup_run):
    first = setup_run("torch==2.13.0")
    assert first[0][:2] == ["-m", "venv"]
    assert torch_installs(first) == [["torch==2.13.0"]]
    assert installs_project(first)
    assert setup_run("torch==2.13.0") == []  # re-run: nothing to do

    gpu = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    changed = setup_run(gpu)
    assert torch_installs(changed) == [gpu.split()]  # options reach pip as separate words
    assert not any(c[:2] == ["-m", "venv"] for c in changed)  # in the same venv
    assert installs_project(changed)  # and the project on top of the new torch
    assert setup_run(gpu) == []

    assert torch_installs(setup_run("torch>=2.6")) == [["torch>=2.6"]]  # not a shell redirection
