"""One copy of the base weights per device, shared by the engine and the trainer.

On CPU the weights travel as numpy arrays (bf16 as a 16-bit integer view, since numpy has no
bfloat16): a shared-memory store such as Ray's object store hands them to every process on
the node without a copy, and `attach_weights` points the model's parameters at those buffers.
The buffers are read-only; base weights are never written after loading (they do not require
grad, and training only updates LoRA parameters).

On CUDA the weights stay where the engine loaded them: `export_cuda_handles` gives CUDA IPC
handles (torch.multiprocessing's tensor reduction, picklable, a few hundred bytes each) and
`attach_cuda_handles` opens them in the trainer, on the same physical GPU (both actors sit in
one placement-group bundle, so Ray gives them the same device). The engine keeps the tensors
alive for as long as the trainer runs: they are its own weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

_VIEW_AS = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}


def export_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer that holds checkpoint data, as numpy arrays (copies)."""
    out = {}
    for name, tensor in _state(model).items():
        t = tensor.detach().contiguous().cpu()
        out[name] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        out[f"{name}::dtype"] = np.array(str(t.dtype).removeprefix("torch."))
    return out


def attach_weights(model: nn.Module, arrays: dict[str, np.ndarray]) -> int:
    """Point the model's parameters at the given buffers, without copying. Returns the number
    of bytes now shared. The model must have been built with matching shapes (on any device
    type "cpu" or "meta")."""
    shared = 0
    state = _state(model)
    missing = set(state) - {k for k in arrays if not k.endswith("::dtype")}
    if missing:
        raise ValueError(f"shared weights lack {sorted(missing)[:3]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name in state:
            dtype = getattr(torch, str(arrays[f"{name}::dtype"]))
            tensor = torch.from_numpy(arrays[name])
            if dtype == torch.bfloat16:
                tensor = tensor.view(torch.bfloat16)
            _assign(model, name, tensor)
            shared += tensor.numel() * tensor.element_size()
    return shared


def export_cuda_handles(model: nn.Module) -> dict[str, tuple]:
    """name -> (rebuild function, its arguments): CUDA IPC handles of every parameter."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = {}
    for name, tensor in _state(model).items():
        if tensor.device.type != "cuda":
            raise ValueError(f"{name} is on {tensor.device}, not a CUDA device: share it with export_weights")
        handles[name] = reduce_tensor(tensor.detach())
    return handles


def attach_cuda_handles(model: nn.Module, handles: dict[str, tuple]) -> int:
    """Open the engine's CUDA IPC handles and point the model's parameters at them (no copy,
    no second allocation). Returns the bytes now shared."""
    state = _state(model)
    missing = set(state) - set(handles)
    if missing:
        raise ValueError(f"shared weights lack {sorted(missing)[:3]}")
    shared = 0
    for name in state:
        rebuild, args = handles[name]
        tensor = rebuild(*args)
        _assign(model, name, tensor)
        shared += tensor.numel() * tensor.element_size()
    return shared


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only: buffers (rotary tables) are cheap to rebuild in each process."""
    return dict(model.named_parameters())


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: shared shape {tuple(tensor.shape)} != model shape {tuple(old.shape)}")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
