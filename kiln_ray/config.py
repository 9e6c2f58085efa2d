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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

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
    max_waiting_requests: int = Field(256, ge=0, description="sequences that may wait beyond max_num_seqs; more are refused (HTTP 429)")
    enable_prefix_caching: bool | None = Field(None, description="default: on, except for hybrid models")
    kernels: Literal["auto", "reference", "fast"] = "auto"
    max_loras: int = Field(4, ge=0, description="adapter slots resident at once (0 disables LoRA serving)")
    max_lora_rank: int = Field(32, ge=1, le=512, description="largest rank a slot holds (compositions add ranks)")
    lora_targets: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="modules adapters may adapt; add in_proj_qkv/in_proj_z/in_proj_b/in_proj_a/out_proj for linear attention",
    )
    prepack_weights: bool = Field(
        True,
        description=(
            "CPU bf16 without AMX: keep oneDNN-packed copies of the projections (faster, +1x weight memory);"
            " on an AMX CPU nothing is packed: the AMX kernel reads the plain weights"
        ),
    )


class DeployConfig(_Frozen):
    """How the Serve app is laid out on the cluster (CPU shares matter on small machines: a
    replica takes one whole CPU unless told otherwise)."""

    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.25, gt=0, description="CPUs reserved per ingress replica")
    engine_replicas: int = Field(1, ge=1, description="one per device")
    engine_cpus: float = Field(1.0, gt=0, description="CPUs reserved for the engine in its bundle")
    trainer_cpus: float = Field(0.5, ge=0, description="CPUs reserved beside it for the trainer actor")
    engine_gpu_fraction: float = Field(0.7, gt=0, le=1, description="on a GPU: the engine's share of the device")
    ingress_max_ongoing_requests: int = Field(512, ge=1)
    engine_max_ongoing_requests: int = Field(1024, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    def gpu_shares(self, use_gpu: bool) -> tuple[float, float]:
        """(engine, trainer) `num_gpus` of the two actors in one engine replica's bundle. On a
        GPU the bundle holds the whole device: the engine takes `engine_gpu_fraction` and the
        trainer the rest, so the two fit the bundle's one GPU together; without a GPU, (0, 0).
        build_app gives the engine its share, the engine replica gives the trainer its own."""
        if not use_gpu:
            return 0.0, 0.0
        return self.engine_gpu_fraction, 1.0 - self.engine_gpu_fraction


class TrainingConfig(_Frozen):
    """The trainer actor and the defaults of a training job (a request may override them)."""

    enabled: bool = Field(True, description="run a trainer beside each engine")
    max_queued_jobs: int = Field(16, ge=1, description="queued jobs past which submissions get 503")
    num_threads: int = Field(1, ge=1, description="torch threads of the trainer (it shares the device)")
    niceness: int = Field(
        5, ge=0, le=19, description="process priority of the trainer; serving runs at 0, so above 0 it yields the cores to decoding"
    )
    warm_up: bool = Field(True, description="run one throwaway step at start, not on the first job")
    gradient_checkpointing: bool = True
    webhook_url: str | None = Field(None, description="POST job status here on completion/failure")
    allow_job_webhooks: bool = Field(False, description="let a job name its own webhook URL (off: SSRF risk)")
    learning_rate: float = Field(3e-4, gt=0)
    steps: int = Field(12, ge=1, description="optimizer steps of a job")
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    replay_per_step: int = Field(1, ge=0, description="earlier examples of the adapter mixed into each step")
    early_stop_loss: float | None = Field(0.05, ge=0, description="stop a job once its examples' loss is below this")
    kl_coeff: float = Field(0.04, ge=0, description="GRPO: weight of the KL to the base model")
    clip_epsilon: float = Field(0.2, gt=0, description="GRPO: ratio clipping")
    upload_max_bytes: int = Field(
        256 << 20, ge=1, description="largest adapter upload accepted: the tar.gz, and separately what it expands to"
    )


class KilnConfig(_Frozen):
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), an HF directory or a .gguf file")
    dtype: DType = Field("auto", description="weights and activations; auto = bfloat16")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    home: str = Field(
        default_factory=lambda: os.environ.get("KILN_HOME", str(Path.home() / ".cache" / "kiln-ray")),
        description="cache directory (converted models, adapters)",
    )
    served_model_name: str | None = Field(None, description="the model id clients use; default: the model's name")
    num_threads: int | None = Field(None, ge=1, description="torch threads of the engine (default: all cores)")
    request_timeout_s: float = Field(
        600.0, gt=0, description="a generation request fails with 504 after this (the wait for its first token included)"
    )
    stream_interval: int = Field(
        1, ge=1, description="engine steps per streamed chunk: a stream's tokens go out every this many steps (the "
        "first at once, a finish at once); more means fewer, larger SSE events, cheaper for ingress, proxy and client"
    )
    api_key: SecretStr | None = Field(None, description="required on every /v1 route when set (set it by env: KILN_API_KEY)")
    admin_key: SecretStr | None = Field(
        None, description="required on training and adapter-changing routes (KILN_ADMIN_KEY); default: the API key"
    )
    metrics_require_key: bool = Field(False, description="/metrics needs the API key too")
    engine: EngineConfig = EngineConfig()
    training: TrainingConfig = TrainingConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _servable_default_rank(self) -> KilnConfig:
        if self.training.lora_rank > self.engine.max_lora_rank:
            raise ValueError(f"training.lora_rank {self.training.lora_rank} is above engine.max_lora_rank "
                             f"{self.engine.max_lora_rank}: the adapters jobs train could not be served")
        return self

    @property
    def adapter_dir(self) -> Path:
        return Path(self.home) / "adapters"

    @property
    def state_dir(self) -> Path:
        return Path(self.home) / "state"

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
