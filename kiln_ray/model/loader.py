"""Load a checkpoint into CausalLM: a Hugging Face directory (config.json + safetensors, sharded
or not) or a GGUF file (dequantised)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from kernels.dispatch import Kernels, select_kernels
from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.config import ModelConfig

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(HF config dict, lazy iterator of (transformers name, tensor)) for a directory or .gguf file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from kiln_ray.model.gguf import read_gguf

        ckpt = read_gguf(path)
        return ckpt.hf_config, ckpt.tensors()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is neither a checkpoint directory nor a .gguf file")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    return json.loads(config_file.read_text()), _iter_safetensors(files)


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_model_config(path: str | Path) -> ModelConfig:
    """The architecture facts of a checkpoint, without reading its weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from kiln_ray.model.gguf import read_gguf

        return ModelConfig.from_hf(read_gguf(path).hf_config)
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    kernels: Kernels | None = None,
) -> CausalLM:
    """Build CausalLM from the checkpoint's config and fill its weights (cast to dtype)."""
    hf_config, weights = read_checkpoint(path)
    cfg = ModelConfig.from_hf(hf_config)
    device = torch.device(device)
    with torch.device(device):
        model = CausalLM(cfg, kernels or select_kernels(device, dtype=dtype), dtype)
    model.load_weights(weights)
    model.eval()
    log.info(
        "loaded %s (%s, %d layers, %.0fM parameters, %s) from %s",
        cfg.architecture,
        "hybrid" if cfg.is_hybrid else "full attention",
        cfg.num_hidden_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(dtype).removeprefix("torch."),
        path,
    )
    return model
