"""select_kernels chooses by device, not by importability: with importable (fake)
flash-linear-attention and flash-attn packages, CPU still gets the torch/C kernels and never
calls them, while the same probes on a CUDA device pick them.

The fakes behave like the real packages on a CPU machine: they import, and every call fails.
"""

import sys
import types

import pytest
import torch

from kernels import attention, gated_delta
from kernels.dispatch import select_kernels
from kiln_ray.config import EngineConfig
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model
from tests.engine.greedy import run_to_completion

CUDA = torch.device("cuda")  # a device object needs no CUDA runtime; nothing here runs on it


def _fails_like_fla_on_cpu(*args, **kwargs):
    raise RuntimeError("0 active drivers ([]). There should only be one.")


def install_fake_gpu_packages(monkeypatch) -> None:
    """Make `fla.ops.gated_delta_rule` and `flash_attn` importable; every call they offer raises."""
    fla = types.ModuleType("fla")
    fla_ops = types.ModuleType("fla.ops")
    fla_gdr = types.ModuleType("fla.ops.gated_delta_rule")
    fla_gdr.chunk_gated_delta_rule = _fails_like_fla_on_cpu
    fla_gdr.fused_recurrent_gated_delta_rule = _fails_like_fla_on_cpu
    fla.ops, fla_ops.gated_delta_rule = fla_ops, fla_gdr
    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = _fails_like_fla_on_cpu
    for module in (fla, fla_ops, fla_gdr, flash_attn):
        monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.fixture
def fake_gpu_packages(monkeypatch):
    install_fake_gpu_packages(monkeypatch)


@pytest.fixture
def no_gpu_packages(monkeypatch):
    """`import fla...` and `import flash_attn` raise ImportError, whatever is installed."""
    for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("fake_gpu_packages")
def test_importable_packages_are_available_on_cuda_only():
    assert gated_delta.fla_available(CUDA)
    assert not gated_delta.fla_available("cpu")
    assert attention.flash_attn_available(CUDA, torch.bfloat16, 256)
    assert not attention.flash_attn_available(torch.device("cpu"), torch.bfloat16, 256)


@pytest.mark.usefixtures("no_gpu_packages")
def test_cuda_without_the_packages_is_not_available():
    assert not gated_delta.fla_available(CUDA)
    assert not attention.flash_attn_available(CUDA, torch.bfloat16, 256)


@pytest.mark.usefixtures("fake_gpu_packages")
@pytest.mark.parametrize("mode", ["auto", "fast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cpu_never_picks_fla_or_flash_attn_even_when_they_import(mode, dtype):
    kernels = select_kernels("cpu", mode, dtype, block_size=256)
    assert "fla" not in kernels.name and "flash" not in kernels.name
    assert kernels.chunk_gated_delta_rule is gated_delta.chunk_gated_delta_rule
    assert kernels.gated_delta_decode in (gated_delta.gated_delta_decode, gated_delta.gated_delta_decode_cpu)
    assert kernels.gated_delta_prefill in (gated_delta.gated_delta_prefill, gated_delta.gated_delta_prefill_cpu)
    assert kernels.paged_attention in (attention.paged_attention, attention.paged_attention_cpu)


@pytest.mark.usefixtures("fake_gpu_packages")
def test_cuda_picks_fla_and_flash_attn_when_they_import():
    kernels = select_kernels(CUDA, "auto", torch.bfloat16, block_size=256)
    assert kernels.name == "cuda+flash-attn+fla"
    assert kernels.chunk_gated_delta_rule is gated_delta.fla_chunk_gated_delta_rule
    assert kernels.gated_delta_decode is gated_delta.fla_gated_delta_decode
    assert kernels.gated_delta_prefill is gated_delta.fla_gated_delta_prefill
    assert kernels.paged_attention is attention.flash_paged_attention
    # fla's chunk kernel rejects fp32, flash-attn's paged path needs 256-token pages.
    assert select_kernels(CUDA, "auto", torch.float32, block_size=256).name == "cuda"
    assert select_kernels(CUDA, "auto", torch.bfloat16, block_size=16).name == "cuda+fla"


def test_a_hybrid_model_serves_on_cpu_in_bf16_with_the_packages_importable(tiny_model_dirs, monkeypatch):
    """Prefill and decode of a Qwen3.5 hybrid model in bf16 (the dtype fla would take) with the
    failing fakes importable: had any op reached them it would raise. Same tokens as without."""
    path, _ = tiny_model_dirs["qwen3_5"]
    prompt = list(range(3, 40))

    def generate() -> list[int]:
        engine = LLMEngine(load_model(path, torch.bfloat16), EngineConfig(block_size=4, num_kv_blocks=32))
        engine.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0.0, min_tokens=6))
        assert "fla" not in engine.model.kernels.name
        return run_to_completion(engine)["r"][0]

    expected = generate()
    install_fake_gpu_packages(monkeypatch)
    assert generate() == expected
