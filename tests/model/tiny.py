"""Tiny random-weight transformers models of every supported architecture, saved as HF
checkpoint directories (fp32), for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_5")
# Parity-only variants of an architecture (not run through every engine test).
VARIANTS = (*ARCHITECTURES, "llama_bias")


def tiny_hf_config(arch: str):
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=3, tie_word_embeddings=True, rope_theta=10000.0, **common)
    if arch == "llama_bias":  # biases on q/k/v/o (attention_bias) and gate/up/down (mlp_bias)
        return tf.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0,
                              attention_bias=True, mlp_bias=True, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=3, tie_word_embeddings=False, rope_theta=1e6, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=3, head_dim=32, tie_word_embeddings=True, rope_theta=1e6, **common)
    if arch == "qwen3_5":
        return tf.Qwen3_5TextConfig(
            num_hidden_layers=4,  # 3 linear + 1 full
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
            **common,
        )
    raise ValueError(arch)


def build_tiny_model(arch: str, seed: int = 0):
    """A transformers CausalLM with random weights; norms and gates perturbed so that no
    parameter sits at its identity init (parity must exercise every term)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch)
    cls = tf.Qwen3_5ForCausalLM if arch == "qwen3_5" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg) if cls is tf.AutoModelForCausalLM else cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("dt_bias") or name.endswith("A_log"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.05)
    return model.float().eval()


def save_tiny_model(arch: str, directory: Path, seed: int = 0):
    model = build_tiny_model(arch, seed)
    model.save_pretrained(directory)
    return model
