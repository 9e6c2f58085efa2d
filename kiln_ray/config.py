"""KilnConfig and its parts: validated once, frozen, passed down explicitly.

Sources, later wins: field defaults < serve_config.yaml `args` < `KILN_*` environment variables
(`KILN_MODEL=...` for a top-level field, `KILN_ENGINE__MAX_NUM_SEQS=...` for a nested one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DType = Literal["auto", "bfloat16", "float16", "float32"]

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineConfig(_Frozen):
    """The LLMEngine: KV cache, scheduler limits, kernels."""

    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=1, description="exact KV block count (overrides the byte budget)")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache budget in bytes")
    kv_cache_memory_fraction: float = Field(
        0.25, gt=0, le=0.95, description="without an explicit budget: this share of free device memory"
    )
    kv_cache_dtype: DType = Field("auto", description="auto = the model dtype")
    max_num_seqs: int = Field(64, ge=1, description="sequences in one step at most")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step (prefill chunk size)")
    max_model_len: int | None = Field(None, ge=1, description="context limit; default: the model's, capped at 32768")
    max_waiting_requests: int = Field(256, ge=0, description="queue length past which new requests are refused")
    enable_prefix_caching: bool | None = Field(None, description="default: on, except for hybrid models")
    kernels: Literal["auto", "reference", "fast"] = "auto"
    prepack_weights: bool = Field(
        True, description="CPU bf16: keep oneDNN-packed copies of the projections (faster, +1x weight memory)"
    )


class KilnConfig(_Frozen):
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), an HF directory or a .gguf file")
    dtype: DType = Field("auto", description="weights and activations; auto = bfloat16")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    home: str = Field(
        default_factory=lambda: os.environ.get("KILN_HOME", str(Path.home() / ".cache" / "kiln-ray")),
        description="cache directory (converted models, adapters)",
    )
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="torch threads of the engine (default: all cores)")
    engine: EngineConfig = EngineConfig()

    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "auto" else _TORCH_DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> KilnConfig:
        """Validate serve args with `KILN_*` environment overrides applied on top."""
        merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (args or {}).items()}
        env = os.environ if env is None else env
        for key, value in env.items():
            if not key.startswith("KILN_"):
                continue
            path = key.removeprefix("KILN_").lower().split("__")
            if path[0] not in cls.model_fields:
                continue
            target = merged
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
        return cls.model_validate(merged)


def torch_dtype(name: str, default: torch.dtype) -> torch.dtype:
    """'auto' -> default, else the named dtype."""
    return default if name == "auto" else _TORCH_DTYPES[name]
