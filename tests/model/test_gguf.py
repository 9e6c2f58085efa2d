"""read_gguf against transformers: tiny models written the way llama.cpp's converter writes them,
and the real embedded SmolLM2 GGUF converted to a transformers directory; and `load_model` on
a .gguf file against transformers loading the same file (`gguf_file=`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.default_model import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    default_gguf_path,
    ensure_default_model,
)
from kiln_ray.model.gguf import read_gguf
from kiln_ray.model.loader import load_model
from tests.helpers import rel_rms
from tests.model.test_causal_lm import rel_max_err

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Our model against transformers on the same dequantised weights: max |diff| / std(logits), fp32.
GGUF_LOGITS_TOL = 1e-4


# --- tiny models through a llama.cpp-style writer -------------------------------------------

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

# id -> (gguf architecture, transformers config)
TINY_MODELS = {
    "llama-tied": ("llama", transformers.LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=10000.0)),
    "llama-bias-untied": (
        "llama",
        transformers.LlamaConfig(**TINY, tie_word_embeddings=False, attention_bias=True, rope_theta=500000.0),
    ),
    "qwen2-bias-untied": ("qwen2", transformers.Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3-qknorm-tied": (
        "qwen3",
        transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen3-qknorm-head128-untied": (
        "qwen3",
        transformers.Qwen3Config(**TINY, head_dim=128, tie_word_embeddings=False, rope_theta=1e6),
    ),
}


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_like_llama_cpp(model: transformers.PreTrainedModel, arch: str, path: Path) -> None:
    """F32 GGUF with llama.cpp's metadata keys, tensor names (gguf's own name map) and q/k permutation."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tokenizer_model("gpt2")  # transformers' GGUF reader takes vocab_size from the token list
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = _llama_cpp_permute(data, heads, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = _llama_cpp_permute(data, heads, kv_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_gguf(name: str, directory: Path) -> tuple[str, transformers.PreTrainedModel, Path]:
    """(arch, random transformers model, its GGUF path)."""
    arch, config = TINY_MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every tensor random, biases and norms included, so nothing matches by luck
        for param in model.parameters():
            param.normal_()
    path = directory / f"{name}.gguf"
    _write_like_llama_cpp(model, arch, path)
    return arch, model, path


@pytest.fixture(params=list(TINY_MODELS), ids=list(TINY_MODELS))
def tiny(request, tmp_path):
    return _tiny_gguf(request.param, tmp_path)


def test_read_gguf_recovers_every_tensor_exactly(tiny):
    arch, model, path = tiny
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]

    checkpoint = read_gguf(path)
    actual = dict(checkpoint.tensors())

    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32
        assert torch.equal(actual[name], tensor), name


def test_llama_q_and_k_are_stored_permuted_and_read_back_unpermuted(tiny):
    """Guards the test above: the file really holds llama.cpp's row order for llama only."""
    arch, model, path = tiny
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    original = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(stored["blk.0.attn_q.weight"], original) == (arch != "llama")


def test_read_gguf_config_builds_the_same_model(tiny):
    arch, model, path = tiny
    checkpoint = read_gguf(path)
    config = checkpoint.hf_config
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == model.config.rope_parameters["rope_theta"]

    rebuilt = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config), dtype=torch.float32
    ).eval()
    missing, unexpected = rebuilt.load_state_dict(dict(checkpoint.tensors()), strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if config["tie_word_embeddings"] else [])
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)


# --- a GGUF file straight into our model ------------------------------------------------------

# What transformers' GGUF loader can read back: it ignores qwen3.attention.key_length (so
# head_dim must be its Qwen3 default, 128) and llama's attention biases (it builds the model
# without them: 4.4 std off the original's logits, measured).
LOADS_IN_BOTH = ["llama-tied", "qwen2-bias-untied", "qwen3-qknorm-head128-untied"]
IDS = torch.tensor([5, 17, 3, 99, 42, 8, 120, 31, 64, 2, 77])


def our_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), ForwardContext.dense([len(ids)])))


@pytest.mark.parametrize("name", LOADS_IN_BOTH)
def test_load_model_on_a_gguf_file_matches_transformers_on_the_same_file(name, tmp_path):
    _, _, path = _tiny_gguf(name, tmp_path)
    ours = load_model(path, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    assert rel_max_err(our_logits(ours, IDS), expected) < GGUF_LOGITS_TOL


def test_load_model_on_a_gguf_file_matches_the_model_it_was_written_from(tiny):
    """Every tiny model, including those transformers' GGUF loader gets wrong (llama with
    biases on all four attention projections)."""
    _, model, path = tiny
    with torch.no_grad():
        expected = model(IDS[None]).logits[0]
    assert rel_max_err(our_logits(load_model(path, torch.float32), IDS), expected) < GGUF_LOGITS_TOL


def test_read_gguf_rejects_unknown_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'falcon'"):
        read_gguf(path)


# --- the real embedded SmolLM2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    return read_gguf(default_gguf_path())


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("kiln-home"), progress=False)


@pytest.fixture(scope="module")
def transformers_gguf_model():
    """transformers' own GGUF loader on the same file: the reference for our conversion."""
    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.real_model
def test_smollm2_gguf_config(smollm2_gguf):
    config = smollm2_gguf.hf_config
    assert smollm2_gguf.architecture == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in smollm2_gguf.tensor_names
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (smollm2_gguf.bos_token, smollm2_gguf.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.real_model
def test_smollm2_dequantised_tensors_equal_transformers_gguf_loader(smollm2_gguf, transformers_gguf_model):
    reference = transformers_gguf_model.state_dict()
    for name, tensor in smollm2_gguf.tensors():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.real_model
def test_load_model_on_the_smollm2_gguf_matches_transformers_on_the_same_file(
    transformers_gguf_model, default_model_dir
):
    """The Q4_1 file itself, dequantised by our reader into our model, no conversion step."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"][0]
    with torch.no_grad():
        expected = transformers_gguf_model(ids[None]).logits[0]
    ours = our_logits(load_model(default_gguf_path(), torch.float32), ids)
    assert rel_max_err(ours, expected) < GGUF_LOGITS_TOL
    assert ours[-1].argmax() == expected[-1].argmax()


@pytest.mark.real_model
def test_converted_directory_layout(converted_dir):
    assert converted_dir.name == DEFAULT_MODEL_NAME
    assert (converted_dir / COMPLETE_MARKER).is_file()
    assert not list(converted_dir.parent.glob(".*partial"))
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert json.loads((converted_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer_config = json.loads((converted_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


@pytest.mark.real_model
def test_converted_model_loads_cleanly_and_answers_paris(converted_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        converted_dir, dtype=torch.float32, output_loading_info=True
    )
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
def test_converted_logits_match_transformers_gguf_loader_rounded_to_bf16(converted_dir, transformers_gguf_model):
    """Our directory stores bf16; the reference rounded to bf16 the same way must agree to float noise."""
    model = transformers.AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    reference = transformers_gguf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted_dir)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected_fp32 = reference(**ids).logits
        rounded = {k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()}
        original = {k: v.clone() for k, v in reference.state_dict().items()}
        reference.load_state_dict(rounded)
        try:
            expected_bf16 = reference(**ids).logits
        finally:
            reference.load_state_dict(original)
        actual = model(**ids).logits
    assert rel_rms(actual, expected_bf16) < 1e-4
    assert rel_rms(actual, expected_fp32) < 2e-2  # bf16 storage alone


@pytest.mark.real_model
def test_failed_conversion_leaves_target_untouched_and_no_partial_dir(tmp_path, monkeypatch):
    from kiln_ray.model import default_model

    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "half-written").write_text("")  # no marker: incomplete, so due for conversion

    def interrupted(checkpoint, staging, dtype, progress):
        (staging / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model.convert_gguf_to_hf(default_gguf_path(), out_dir, dtype=torch.bfloat16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out_dir.iterdir()] == ["half-written"]
    assert not default_model.is_complete(out_dir)
