"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: a config.json dict plus tensors
under transformers' parameter names, dequantised to float.

llama.cpp's converter changes a checkpoint in three ways, each undone here:

1. Names: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`, and so on.
2. Shapes: GGUF lists dimensions fastest-first (ne0 = in_features), the reverse of torch's
   [out, in]; the data itself is row-major [out, in], so reversing the listed shape is enough.
3. Rotary layout (llama only, not qwen2/qwen3): ggml's llama rope rotates adjacent pairs, so
   the converter reorders the rows of each q/k head from rotate_half's halves to pairs:

       transformers, per head:  r0 r1 ... r(d/2-1) | r(d/2) ... r(d-1)
       GGUF (llama):            r0 r(d/2) r1 r(d/2+1) ... r(d/2-1) r(d-1)

   `_unpermute_rotary` restores the first layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

# general.architecture -> transformers model class.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Leaf name inside `blk.N.` -> module path inside `model.layers.N.`.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFCheckpoint:
    """One GGUF file, opened (memory-mapped) but not yet dequantised.

    `hf_config` is what the model's transformers config.json holds. Tensors are read lazily by
    `tensors()`; the checkpoint stays valid while the file is unchanged on disk.
    """

    path: Path
    architecture: str  # general.architecture: llama | qwen2 | qwen3
    hf_config: dict[str, Any]
    chat_template: str | None
    bos_token: str | None  # token strings of the ids in hf_config, from the GGUF vocabulary
    eos_token: str | None
    pad_token: str | None
    _reader: GGUFReader = field(repr=False, compare=False)
    _hf_names: tuple[str, ...] = field(repr=False, compare=False)  # parallel to _reader.tensors

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """transformers parameter names, in file order."""
        return self._hf_names

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) in file order, one tensor dequantised at a time.

        Each tensor is [out, in] (1-D for norms and biases) in `dtype`, owned by the caller; the
        generator dequantises one tensor per step, so peak memory is one float32 tensor (two
        for a q/k weight being un-permuted), not the model.
        """
        heads = self.hf_config["num_attention_heads"]
        kv_heads = self.hf_config["num_key_value_heads"]
        for tensor, hf_name in zip(self._reader.tensors, self._hf_names):
            weight = _dequantize(tensor)
            if self.architecture == "llama":
                if ".self_attn.q_proj." in hf_name:
                    weight = _unpermute_rotary(weight, heads)
                elif ".self_attn.k_proj." in hf_name:
                    weight = _unpermute_rotary(weight, kv_heads)
            yield hf_name, weight.to(dtype)


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file and read its metadata; raises ValueError for an unsupported file."""
    path = Path(path)
    reader = GGUFReader(path)
    architecture = _field(reader, "general.architecture")
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {architecture!r} in {path.name} is not supported "
            f"(supported: {', '.join(_ARCHITECTURES)})"
        )
    by_name = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in by_name:
        raise ValueError(f"{path.name}: per-frequency rope scaling (rope_freqs.weight, llama3-style) is not supported")
    hf_names = tuple(_hf_name(t.name, architecture) for t in reader.tensors)
    hf_config = _hf_config(reader, architecture, by_name)
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(token_id: int | None) -> str | None:
        return None if token_id is None or tokens is None else tokens.contents(token_id)

    return GGUFCheckpoint(
        path=path,
        architecture=architecture,
        hf_config=hf_config,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=token(hf_config["bos_token_id"]),
        eos_token=token(hf_config["eos_token_id"]),
        pad_token=token(hf_config["pad_token_id"]),
        _reader=reader,
        _hf_names=hf_names,
    )


def _hf_config(reader: GGUFReader, arch: str, by_name: dict[str, ReaderTensor]) -> dict[str, Any]:
    def arch_field(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF file lacks {arch}.{key}")
        return value

    hidden = int(arch_field("embedding_length"))
    heads = int(arch_field("attention.head_count"))
    head_dim = int(arch_field("attention.key_length", hidden // heads))
    rotary_dim = int(arch_field("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count {rotary_dim} != head_dim {head_dim}) is not supported")
    rope_theta = _float32(arch_field("rope.freq_base", 10000.0))
    embed = by_name.get("token_embd.weight")
    if embed is None:
        raise ValueError("GGUF file lacks token_embd.weight")

    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(embed.shape[1]),  # ne1 of [hidden, vocab]: the rows the model has
        "hidden_size": hidden,
        "intermediate_size": int(arch_field("feed_forward_length")),
        "num_hidden_layers": int(arch_field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(arch_field("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(arch_field("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,  # transformers < 5 reads this, 5 reads rope_parameters
        "rope_parameters": _rope_parameters(reader, arch, rope_theta),
        "max_position_embeddings": int(arch_field("context_length")),
        "tie_word_embeddings": "output.weight" not in by_name,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "dtype": "float32",  # what tensors() yields by default
        "use_cache": True,
    }
    has_qkv_bias = "blk.0.attn_q.bias" in by_name
    if arch == "qwen2":
        config["use_sliding_window"] = False
    else:  # Qwen2Config has no such field: its q/k/v always carry biases
        config["attention_bias"] = has_qkv_bias
    if arch == "llama":
        config["mlp_bias"] = False
    return config


def _rope_parameters(reader: GGUFReader, arch: str, rope_theta: float) -> dict[str, Any]:
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": rope_theta}
    if scaling == "linear":
        factor = _float32(_field(reader, f"{arch}.rope.scaling.factor"))
        return {"rope_type": "linear", "rope_theta": rope_theta, "factor": factor}
    raise ValueError(f"rope scaling {scaling!r} is not supported (none, linear)")


def _hf_name(gguf_name: str, arch: str) -> str:
    layer_names = _LAYER_NAMES | _QK_NORM_NAMES if arch == "qwen3" else _LAYER_NAMES
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, leaf, kind = match.groups()
        if leaf in layer_names:
            return f"model.layers.{layer}.{layer_names[leaf]}.{kind}"
    elif match := _GLOBAL_TENSOR.fullmatch(gguf_name):
        leaf, kind = match.groups()
        if leaf in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[leaf]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no transformers counterpart for architecture {arch!r}")


def _dequantize(tensor: ReaderTensor) -> torch.Tensor:
    """Dequantise one tensor to float32 in torch order (GGUF's ne0-first shape reversed)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type)
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only memmap
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(shape))


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute(w, n_head, n_head_kv)` on the rows of q/k (weight or bias).

    llama.cpp does reshape(H, 2, D/2, ...).swapaxes(1, 2): halves -> interleaved pairs; this
    reads the rows as (H, D/2, 2) and swaps back.  weight: (H*D, ...) -> (H*D, ...)
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # (H, D/2, 2, ...)
    return pairs.transpose(1, 2).reshape(weight.shape).contiguous()


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def _float32(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.999999747e-06; keep the shortest float32 repr."""
    return float(str(np.float32(value)))
