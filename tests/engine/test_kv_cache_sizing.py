"""How many KV blocks the engine allocates: a byte budget (or a share of free memory) divided
by the bytes of one block, after the state slots of a hybrid model are taken from it, never
more than every sequence needs at full length. Expected counts are worked out here from the
transformers configs of the tiny models (fp32 weights)."""

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine import engine as engine_module
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.model.loader import load_model

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    """arch -> (our fp32 model, its transformers config)."""
    return {arch: (load_model(tiny_model_dirs[arch][0], torch.float32), tiny_model_dirs[arch][1].config)
            for arch in ("llama", "qwen3_5")}


def make_engine(model, **overrides) -> LLMEngine:
    return LLMEngine(model, EngineConfig(**{"block_size": BLOCK_SIZE, "max_loras": 0, **overrides}))


def kv_block_bytes(hf_config, dtype_bytes: int) -> int:
    """K and V of BLOCK_SIZE tokens in every full-attention layer."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers
    full_layers = layer_types.count("full_attention")
    return 2 * full_layers * hf_config.num_key_value_heads * head_dim * dtype_bytes * BLOCK_SIZE


def state_slot_bytes(hf_config, conv_dtype_bytes: int) -> int:
    """One sequence's Gated DeltaNet state in every linear-attention layer: the float32
    recurrent state (Hv, Dk, Dv) and the conv window (q, k, v channels x kernel - 1)."""
    c = hf_config
    linear_layers = c.layer_types.count("linear_attention")
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    conv_channels = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    return linear_layers * (recurrent + conv_channels * (c.linear_conv_kernel_dim - 1) * conv_dtype_bytes)


def allocated_bytes(engine: LLMEngine) -> tuple[int, int]:
    """(bytes of the KV cache tensors, bytes of the state slot tensors) the runner holds."""
    caches = engine.runner.caches
    kv = sum(t.numel() * t.element_size() for pair in caches.kv for t in pair)
    states = sum(t.numel() * t.element_size() for t in (*caches.conv, *caches.recurrent))
    return kv, states


def test_a_byte_budget_buys_whole_blocks_of_the_cache_dtype(models):
    model, hf_config = models["llama"]
    per_block = kv_block_bytes(hf_config, 4)
    assert per_block == 2 * 3 * 2 * 16 * 4 * 16  # 3 layers, 2 KV heads of 16 dims, fp32
    budget = 10 * per_block + per_block // 2  # the half block is left over
    engine = make_engine(model, kv_cache_bytes=budget)
    assert engine.stats().kv_blocks_total == 10
    kv_bytes, state_bytes = allocated_bytes(engine)
    assert (kv_bytes, state_bytes) == (10 * per_block, 0)
    assert engine.runner.caches.kv[0][0].dtype == torch.float32  # "auto": the model's dtype


@pytest.mark.parametrize(("kv_cache_dtype", "blocks"), [("float32", 10), ("bfloat16", 20), ("float16", 20)])
def test_a_half_width_cache_dtype_doubles_the_blocks(models, kv_cache_dtype, blocks):
    model, hf_config = models["llama"]
    engine = make_engine(model, kv_cache_bytes=10 * kv_block_bytes(hf_config, 4), kv_cache_dtype=kv_cache_dtype)
    assert engine.stats().kv_blocks_total == blocks
    assert engine.runner.caches.kv[0][0].dtype == getattr(torch, kv_cache_dtype)
    assert allocated_bytes(engine)[0] == 10 * kv_block_bytes(hf_config, 4)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_without_a_budget_a_fraction_of_free_memory_is_used(models, monkeypatch, fraction):
    model, hf_config = models["llama"]
    free = 30 * kv_block_bytes(hf_config, 4)
    monkeypatch.setattr(engine_module, "_free_memory", lambda device: free)
    engine = make_engine(model, kv_cache_memory_fraction=fraction)
    assert engine.stats().kv_blocks_total == int(free * fraction) // kv_block_bytes(hf_config, 4) == int(30 * fraction)


def test_free_memory_on_cpu_is_what_the_kernel_reports_available():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert engine_module._free_memory(torch.device("cpu")) == pytest.approx(available, rel=0.1)


def test_hybrid_state_slots_come_out_of_the_budget_first(models):
    model, hf_config = models["qwen3_5"]
    per_slot = state_slot_bytes(hf_config, 4)
    assert per_slot == 3 * (4 * 16 * 16 * 4 + (2 * 2 * 16 + 4 * 16) * 3 * 4)  # 3 linear layers
    per_block = kv_block_bytes(hf_config, 4)
    assert per_block == 2 * 1 * 2 * 32 * 4 * 16  # 1 full-attention layer
    engine = make_engine(model, max_num_seqs=4, kv_cache_bytes=4 * per_slot + 5 * per_block + per_block - 1)
    assert engine.stats().kv_blocks_total == 5
    assert engine.stats().state_slots_total == 4
    assert allocated_bytes(engine) == (5 * per_block, 4 * per_slot)


def test_hybrid_budget_too_small_for_the_state_slots_is_a_clear_error(models):
    model, hf_config = models["qwen3_5"]
    just_short = 4 * state_slot_bytes(hf_config, 4) + kv_block_bytes(hf_config, 4) - 1
    with pytest.raises(ValueError, match="cannot hold 4 state slots .* lower max_num_seqs or raise kv_cache_bytes"):
        make_engine(model, max_num_seqs=4, kv_cache_bytes=just_short)
    assert make_engine(model, max_num_seqs=4, kv_cache_bytes=just_short + 1).stats().kv_blocks_total == 1


@pytest.mark.parametrize(("max_num_seqs", "max_model_len", "blocks"), [(3, 100, 3 * 7), (2, None, 2 * 32)])
def test_never_more_blocks_than_every_sequence_at_full_length(models, max_num_seqs, max_model_len, blocks):
    """max_num_seqs x ceil(max_model_len / block_size), however large the budget."""
    model, _ = models["llama"]
    engine = make_engine(model, kv_cache_bytes=1 << 40, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    assert engine.stats().kv_blocks_total == blocks == max_num_seqs * -(-(max_model_len or MAX_MODEL_LEN) // BLOCK_SIZE)


def test_a_budget_under_one_block_gets_one_block_and_a_shorter_context(models):
    model, hf_config = models["llama"]
    engine = make_engine(model, kv_cache_bytes=kv_block_bytes(hf_config, 4) - 1)
    assert engine.stats().kv_blocks_total == 1
    assert engine.max_model_len == BLOCK_SIZE
