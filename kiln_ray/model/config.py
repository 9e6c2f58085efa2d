"""ModelConfig: the architecture facts of one checkpoint, read once from its HF config.

Every supported architecture is a setting of the same fields:

    llama (SmolLM2)  full attention everywhere, plain RMSNorm
    qwen2            + q/k/v bias
    qwen3            + per-head q/k RMSNorm
    qwen3_5 (text)   hybrid: Gated DeltaNet ("linear_attention") layers and full-attention
                     layers with q/k norm, a sigmoid output gate and partial rotary;
                     zero-centred RMSNorm (weight stored as w, applied as 1 + w)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_5")

# model_type values in config.json -> our architecture name.
_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its settings is not implemented."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int  # leading dims of each head that rotate; the rest pass through
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]  # "full_attention" | "linear_attention", one per layer
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v biases
    o_proj_bias: bool = False  # Llama's attention_bias biases o_proj too; Qwen2's does not
    mlp_bias: bool = False  # Llama's mlp_bias: gate/up/down biases
    qk_norm: bool = False
    attn_output_gate: bool = False
    zero_centered_norm: bool = False
    # Gated DeltaNet (linear_attention layers); unused by full-attention-only models.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def num_full_attention_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def is_hybrid(self) -> bool:
        return self.num_linear_attention_layers > 0

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the causal conv: q, k and v concatenated."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_full_attention_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json (a multimodal Qwen3.5 config uses its text_config)."""
        model_type = hf.get("model_type")
        if model_type == "qwen3_5" and "text_config" in hf:
            text = dict(hf["text_config"])
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
            hf = {**text, "model_type": "qwen3_5_text"}
        arch = _MODEL_TYPES.get(model_type or "")
        if arch is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")

        hidden = hf["hidden_size"]
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden // heads
        num_layers = hf["num_hidden_layers"]
        if arch == "qwen3_5":
            layer_types = hf.get("layer_types") or [
                "full_attention" if (i + 1) % hf.get("full_attention_interval", 4) == 0 else "linear_attention"
                for i in range(num_layers)
            ]
        else:
            layer_types = ["full_attention"] * num_layers
        if any(t not in ("full_attention", "linear_attention") for t in layer_types):
            raise UnsupportedModelError(f"unsupported layer types {sorted(set(layer_types))}")
        if hf.get("sliding_window") and hf.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            layer_types=tuple(layer_types[:num_layers]),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf, head_dim),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            o_proj_bias=arch != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_5"),
            attn_output_gate=arch == "qwen3_5",
            zero_centered_norm=arch == "qwen3_5",
            linear_num_key_heads=hf.get("linear_num_key_heads", 0) if arch == "qwen3_5" else 0,
            linear_num_value_heads=hf.get("linear_num_value_heads", 0) if arch == "qwen3_5" else 0,
            linear_key_head_dim=hf.get("linear_key_head_dim", 0) if arch == "qwen3_5" else 0,
            linear_value_head_dim=hf.get("linear_value_head_dim", 0) if arch == "qwen3_5" else 0,
            linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 0) if arch == "qwen3_5" else 0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_from_hf(hf: dict[str, Any], head_dim: int) -> RopeConfig:
    # transformers 5 folds rope_theta / rope_scaling / partial_rotary_factor into rope_parameters.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else scaling
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=float(theta),
        rotary_dim=int(head_dim * partial),
        scaling_type=kind,
        factor=float(src.get("factor", 1.0)),
        low_freq_factor=float(src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(src.get("high_freq_factor", 4.0)),
        original_max_position=src.get("original_max_position_embeddings"),
    )
