"""One copy of the base weights: export/attach over shared buffers (CPU, numpy) and CUDA IPC
handles (GPU only). The trainer-side proof with real Ray processes and their memory is in
tests/e2e/test_training.py."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from kernels.dispatch import select_kernels
from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.loader import load_model, read_model_config
from kiln_ray.model.shared_weights import attach_cuda_handles, attach_weights, export_cuda_handles, export_weights
from tests.model.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-share")
    save_tiny_model("qwen3_5", path)
    return path


def fresh(tiny_dir, dtype, device="cpu"):
    with torch.device(device):
        return CausalLM(read_model_config(tiny_dir), select_kernels(torch.device(device), "reference", dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attached_weights_are_views_of_the_shared_buffers(tiny_dir, dtype):
    source = load_model(tiny_dir, dtype, "cpu", select_kernels(torch.device("cpu"), "reference", dtype))
    arrays = export_weights(source)
    model = fresh(tiny_dir, dtype)
    shared = attach_weights(model, arrays)
    assert shared == sum(p.numel() * p.element_size() for p in source.parameters())
    originals = dict(source.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == originals[name].dtype and not p.requires_grad  # (some hybrid params stay fp32)
        assert p.data_ptr() == arrays[name].__array_interface__["data"][0]  # no copy
        assert torch.equal(p, originals[name])


def test_attach_refuses_missing_or_misshapen_weights(tiny_dir):
    arrays = export_weights(load_model(tiny_dir, torch.float32, "cpu"))
    name = next(k for k in arrays if not k.endswith("::dtype"))
    with pytest.raises(ValueError, match="lack"):
        attach_weights(fresh(tiny_dir, torch.float32), {k: v for k, v in arrays.items() if k != name})
    arrays[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        attach_weights(fresh(tiny_dir, torch.float32), arrays)


def test_cuda_handles_refuse_cpu_weights(tiny_dir):
    with pytest.raises(ValueError, match="not a CUDA device"):
        export_cuda_handles(load_model(tiny_dir, torch.float32, "cpu"))


def _open_handles(tiny_dir, handles, queue):
    model = fresh(tiny_dir, torch.bfloat16, "cuda")
    shared = attach_cuda_handles(model, handles)
    queue.put((shared, {n: float(p.float().sum()) for n, p in model.named_parameters()},
               {n: p.data_ptr() for n, p in model.named_parameters()}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (none on this machine)")
def test_cuda_ipc_shares_the_engine_weights_with_another_process(tiny_dir):
    source = load_model(tiny_dir, torch.bfloat16, "cuda")
    handles = export_cuda_handles(source)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_handles, args=(tiny_dir, handles, queue))
    child.start()
    shared, sums, _ = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    assert shared == sum(p.numel() * p.element_size() for p in source.parameters())
    for name, p in source.named_parameters():
        assert sums[name] == pytest.approx(float(p.float().sum()), rel=1e-6)
