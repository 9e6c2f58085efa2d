"""Loading checkpoints: sharded safetensors, and a published-style multimodal Qwen3.5
checkpoint whose language model sits under `model.language_model.` beside a vision tower
and an MTP head (loaded: the text part; skipped: the rest)."""

import json

import torch
from safetensors.torch import save_file

from kiln_ray.model.context import ForwardContext
from kiln_ray.model.loader import load_model
from tests.model.test_causal_lm import rel_max_err
from tests.model.tiny import build_tiny_model

IDS = torch.tensor([5, 17, 3, 99, 42, 8, 200, 31])


def logits_of(model):
    with torch.no_grad():
        return model.compute_logits(model(IDS, torch.arange(len(IDS)), ForwardContext.dense([len(IDS)])))


def hf_logits(hf):
    with torch.no_grad():
        return hf(IDS[None]).logits[0]


def test_sharded_safetensors_load(tmp_path):
    hf = build_tiny_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert rel_max_err(logits_of(load_model(tmp_path, torch.float32)), hf_logits(hf)) < 1e-4


def test_multimodal_qwen3_5_checkpoint_loads_its_language_model(tmp_path, caplog):
    hf = build_tiny_model("qwen3_5")
    tensors = {}
    for name, t in hf.state_dict().items():
        key = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        tensors[key] = t.contiguous()
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(8, 8)
    tensors["model.visual.merger.linear_fc1.weight"] = torch.randn(8, 8)
    tensors["mtp.fc.weight"] = torch.randn(8, 8)
    save_file(tensors, tmp_path / "model.safetensors")
    text = hf.config.to_dict()
    config = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
              "text_config": text, "vision_config": {"depth": 1, "hidden_size": 8}, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("INFO", logger="kiln_ray.model.weight_map"):
        model = load_model(tmp_path, torch.float32)
    assert rel_max_err(logits_of(model), hf_logits(hf)) < 1e-4
    assert "skipped 3 tensors" in caplog.text
