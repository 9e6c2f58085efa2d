"""merge_adapters: exact concat, SVD-truncated weighted average, TIES by hand, and PEFT loading."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from kiln_ray.adapters.merge import merge_adapters, ties_delta
from kiln_ray.adapters.store import AdapterStore, lora_pairs, lora_scale
from tests.adapters.test_store import random_adapter

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def deltas(tensors, config) -> dict[str, torch.Tensor]:
    """{module path: (alpha/r) · B @ A}, the weight update PEFT applies."""
    scale = lora_scale(config)
    return {path: scale * b.float() @ a.float() for path, (a, b) in lora_pairs(tensors).items()}


def weighted_sum(inputs, divide: bool = False) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for tensors, config, weight in inputs:
        for path, delta in deltas(tensors, config).items():
            total[path] = total.get(path, 0) + weight * delta
    norm = sum(w for _, _, w in inputs) if divide else 1.0
    return {path: delta / norm for path, delta in total.items()}


def one_module(delta: list[list[float]]) -> tuple[dict, dict]:
    """An r=2, alpha=2 adapter whose q_proj delta is exactly `delta` (B = delta, A = I)."""
    tensors = {f"{Q}.lora_A.weight": torch.eye(2), f"{Q}.lora_B.weight": torch.tensor(delta)}
    return tensors, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}


def test_concat_is_exact_and_treats_missing_modules_as_zero():
    qv = {"self_attn.q_proj": (16, 16), "self_attn.v_proj": (8, 16)}
    qu = {"self_attn.q_proj": (16, 16), "mlp.up_proj": (24, 16)}
    inputs = [
        (*random_adapter(r=4, alpha=8, modules=qv, seed=1), 0.7),
        (*random_adapter(r=2, alpha=16, modules=qu, seed=2), -1.5),
    ]
    tensors, config = merge_adapters(inputs, "concat")
    assert config["r"] == 6 and config["lora_alpha"] == 6
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    merged, expected = deltas(tensors, config), weighted_sum(inputs)
    assert merged.keys() == expected.keys() and len(merged) == 6
    for path in expected:
        torch.testing.assert_close(merged[path], expected[path], rtol=0, atol=1e-5)


def test_weighted_average_is_exact_when_the_rank_fits():
    first_tensors, first_config = random_adapter(r=4, seed=1)
    second_tensors, second_config = random_adapter(r=8, alpha=4, seed=2)
    for key in second_tensors:  # rank 4 inside r = 8: the weighted sum has rank <= 8
        if key.endswith("lora_A.weight"):
            second_tensors[key][4:] = 0
    inputs = [(first_tensors, first_config, 1.0), (second_tensors, second_config, 3.0)]
    tensors, config = merge_adapters(inputs, "weighted_average")
    assert config["r"] == 8 and config["lora_alpha"] == 8
    merged, expected = deltas(tensors, config), weighted_sum(inputs, divide=True)
    for path in expected:
        torch.testing.assert_close(merged[path], expected[path], rtol=0, atol=1e-5)


def test_weighted_average_truncation_error_is_the_discarded_singular_values():
    inputs = [(*random_adapter(r=4, seed=1), 1.0), (*random_adapter(r=4, seed=2), 1.0)]
    tensors, config = merge_adapters(inputs, "weighted_average")
    assert config["r"] == 4
    merged = deltas(tensors, config)
    for path, exact in weighted_sum(inputs, divide=True).items():
        singular = torch.linalg.svdvals(exact)  # rank 8: four are discarded
        error = torch.linalg.matrix_norm(exact - merged[path])
        torch.testing.assert_close(error**2, (singular[4:] ** 2).sum(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.linalg.svdvals(merged[path])[:4], singular[:4])


def test_ties_trims_elects_and_averages_agreeing_entries_by_hand():
    inputs = [
        (*one_module([[3.0, -1.0], [0.5, 2.0]]), 1.0),  # trimmed: [[3, 0], [0, 2]]
        (*one_module([[-2.0, 4.0], [1.0, -0.1]]), 1.0),  # trimmed: [[-2, 4], [0, 0]]
        (*one_module([[1.0, 0.5], [0.0, 0.1]]), 1.0),  # trimmed: [[1, 0.5], [0, 0]]
    ]
    # sum of trimmed [[2, 4.5], [0, 2]] elects + everywhere (0 counts as +);
    # agreeing means: (3+1)/2, (4+0.5)/2, nothing agrees -> 0, 2/1
    expected = torch.tensor([[2.0, 2.25], [0.0, 2.0]])
    tensors, config = merge_adapters(inputs, "ties", density=0.5)
    assert config["r"] == 2
    torch.testing.assert_close(deltas(tensors, config)[Q], expected, rtol=0, atol=1e-5)


def test_ties_elects_signs_from_weighted_deltas():
    # weights (1, 2): trimmed weighted [[3, 0], [0, 2]] and [[-4, 8], [0, 0]]; sum [[-1, 8], [0, 2]]
    first, second = one_module([[3.0, -1.0], [0.5, 2.0]]), one_module([[-2.0, 4.0], [1.0, -0.1]])
    tensors, config = merge_adapters([(*first, 1.0), (*second, 2.0)], "ties", density=0.5)
    expected = torch.tensor([[-4.0, 8.0], [0.0, 2.0]])
    torch.testing.assert_close(deltas(tensors, config)[Q], expected, rtol=0, atol=1e-5)
    keep_all = ties_delta([torch.tensor([[1.0, -3.0]]), torch.tensor([[3.0, 1.0]])], density=1.0)
    torch.testing.assert_close(keep_all, torch.tensor([[2.0, -3.0]]))


def test_ties_returns_rank_max_r_for_random_adapters():
    inputs = [(*random_adapter(r=2, seed=1), 1.0), (*random_adapter(r=4, seed=2), 0.5)]
    tensors, config = merge_adapters(inputs, "ties", density=0.3)
    assert config["r"] == 4
    assert all(t.shape[0] == 4 for k, t in tensors.items() if k.endswith("lora_A.weight"))


def test_result_keeps_the_input_dtype():
    bf16 = [({k: v.bfloat16() for k, v in t.items()}, c, 1.0)
            for t, c in (random_adapter(seed=1), random_adapter(seed=2))]
    for method in ("concat", "weighted_average", "ties"):
        tensors, _ = merge_adapters(bf16, method)
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_incompatible_inputs_are_refused():
    a = random_adapter(modules={"self_attn.q_proj": (16, 16)}, seed=1)
    wider = random_adapter(modules={"self_attn.q_proj": (16, 32)}, seed=2)
    with pytest.raises(ValueError, match="module shape"):
        merge_adapters([(*a, 1.0), (*wider, 1.0)], "concat")
    other_base = (a[0], {**a[1], "base_model_name_or_path": "x"})
    with pytest.raises(ValueError, match="different base models"):
        merge_adapters([(*other_base, 1.0), (a[0], {**a[1], "base_model_name_or_path": "y"}, 1.0)],
                       "concat")
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_adapters([(*a, 1.0)], "sum")
    with pytest.raises(ValueError, match="non-zero sum"):
        merge_adapters([(*a, 1.0), (*a, -1.0)], "weighted_average")
    with pytest.raises(ValueError, match="density"):
        merge_adapters([(*a, 1.0)], "ties", density=0.0)
    with pytest.raises(ValueError, match="at least one"):
        merge_adapters([], "concat")


@pytest.mark.parametrize("method", ["concat", "weighted_average", "ties"])
def test_weights_that_overflow_float32_are_refused_not_merged_into_inf(method):
    """Finite weights (the API takes any) whose deltas overflow float32 once made the SVD raise
    a LinAlgError (HTTP 500), or stored an adapter that generates NaN."""
    a, b = random_adapter(seed=1), random_adapter(seed=2)
    with pytest.raises(ValueError, match="not finite"):
        merge_adapters([(*a, 1e308), (*b, 1e308)], method)


# --- PEFT round trip -------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def peft_adapter(base, directory, seed):
    """A PEFT LoRA on a copy of base with random lora_B, saved; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)
    return model


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_concat_of_two_peft_adapters_loads_in_peft_as_their_summed_deltas(tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    inputs, expected_weights = [], {k: v.clone() for k, v in base_weights.items()}
    for seed in (1, 2):
        directory = tmp_path / f"peft{seed}"
        model = peft_adapter(base, directory, seed)
        config = json.loads((directory / "adapter_config.json").read_text())
        inputs.append((load_file(directory / "adapter_model.safetensors"), config, 1.0))
        for key, weight in model.merge_and_unload().state_dict().items():
            expected_weights[key] += weight - base_weights[key]
    tensors, config = merge_adapters(inputs, "concat")
    store = AdapterStore(tmp_path / "store")
    version = store.save_version("merged", tensors, config)

    merged = PeftModel.from_pretrained(copy.deepcopy(base), store.version_dir("merged", version))
    expected = copy.deepcopy(base)
    expected.load_state_dict(expected_weights)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, want, plain = merged(tokens).logits, expected(tokens).logits, base(tokens).logits
    assert (want - plain).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
