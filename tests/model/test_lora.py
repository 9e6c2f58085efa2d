"""LoRA against peft: the same adapter on the same tiny model gives the same logits, in
training mode (TrainableLora), in serving mode (AdapterSlots, several adapters in one batch)
and after a round trip through PEFT's file format."""

import pytest
import torch

from kiln_ray.model.context import ForwardContext
from kiln_ray.model.loader import load_model
from kiln_ray.model.lora import DEFAULT_TARGETS, LINEAR_ATTENTION_TARGETS, AdapterSlots, LoraBatch, LoraWeights, TrainableLora, lora_sites
from tests.model.test_causal_lm import PagedHarness, rel_max_err
from tests.model.tiny import ARCHITECTURES, VARIANTS

TOL = 1e-4


def targets_for(arch):
    return DEFAULT_TARGETS + (LINEAR_ATTENTION_TARGETS if arch == "qwen3_5" else ())


def peft_adapter(hf_model, arch, seed, rank=4, alpha=8.0):
    """A peft LoRA adapter with random A and B (peft initialises B to zero) and its tensors."""
    import copy

    import peft

    torch.manual_seed(seed)
    targets = list(targets_for(arch))
    model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    state = peft.get_peft_model_state_dict(model)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets}
    return model.eval(), LoraWeights.from_peft(state, config)


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g) for n in (5, 23, 40)]


def hf_logits(model, sequences):
    with torch.no_grad():
        return [model(s[None]).logits[0] for s in sequences]


@pytest.mark.parametrize("arch", VARIANTS)
def test_trainable_lora_matches_peft(arch, tiny_model_dirs, sequences):
    path, hf = tiny_model_dirs[arch]
    peft_model, weights = peft_adapter(hf, arch, seed=1)
    model = load_model(path, torch.float32, "cpu")
    lora = TrainableLora(lora_sites(model, targets_for(arch)), weights.rank, weights.alpha, init=weights)
    with torch.no_grad():
        ids = torch.cat(sequences)
        pos = torch.cat([torch.arange(len(s)) for s in sequences])
        logits = model.compute_logits(model(ids, pos, ForwardContext.dense([len(s) for s in sequences], lora=lora)))
    start = 0
    for s, ref in zip(sequences, hf_logits(peft_model, sequences)):
        assert rel_max_err(logits[start:start + len(s)], ref) < TOL
        start += len(s)
    assert set(weights.modules) == set(lora.sites)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_of_adapters_matches_each_alone_and_peft(arch, tiny_model_dirs, sequences):
    """Slots 0 and 1 hold adapters X and Y; a batch where sequence 0 uses X, sequence 1 uses
    Y and sequence 2 the base model gives each sequence peft's logits for its adapter."""
    path, hf = tiny_model_dirs[arch]
    peft_x, x = peft_adapter(hf, arch, seed=1)
    peft_y, y = peft_adapter(hf, arch, seed=2, rank=2, alpha=2.0)
    model = load_model(path, torch.float32, "cpu")
    slots = AdapterSlots(model, num_slots=3, max_rank=8, targets=targets_for(arch), dtype=torch.float32)
    slots.load(0, x)
    slots.load(2, y)  # slot 1 stays empty: slots are independent
    harness = PagedHarness(model, len(sequences), max(len(s) for s in sequences))
    got = [[] for _ in sequences]
    lens = [len(s) for s in sequences]
    chunk = 7
    while any(harness.computed[i] < n for i, n in enumerate(lens)):
        work, slot_of_rows, row = [], [], 0
        for i, s in enumerate(sequences):
            done = harness.computed[i]
            if done < lens[i]:
                work.append((i, s[done:done + chunk]))
        work.sort(key=lambda w: len(w[1]) != 1)  # decodes first, as the runner orders them
        groups_rows = {0: [], 2: []}
        for i, tokens in work:
            slot = {0: 0, 1: 2, 2: None}[i]
            if slot is not None:
                groups_rows[slot].extend(range(row, row + len(tokens)))
            row += len(tokens)
        groups = [(slot, torch.tensor(rows)) for slot, rows in groups_rows.items() if rows]
        for (i, _), logits in zip(work, harness.step(work, lora=LoraBatch(slots, groups))):
            got[i].append(logits)
    refs = [hf_logits(peft_x, sequences[:1])[0], hf_logits(peft_y, sequences[1:2])[0], hf_logits(hf, sequences[2:])[0]]
    for i, ref in enumerate(refs):
        assert rel_max_err(torch.cat(got[i]), ref) < TOL, f"sequence {i}"


def test_peft_round_trip_and_composition(tiny_model_dirs, sequences):
    path, hf = tiny_model_dirs["qwen3"]
    _, x = peft_adapter(hf, "qwen3", seed=5)
    tensors, config = x.to_peft("tiny")
    again = LoraWeights.from_peft(tensors, config)
    assert again.rank == x.rank and again.alpha == x.alpha
    for site, (a, b) in x.modules.items():
        assert torch.equal(again.modules[site][0], a) and torch.equal(again.modules[site][1], b)
    # Composition is the exact weighted sum of deltas.
    _, y = peft_adapter(hf, "qwen3", seed=6, rank=2, alpha=4.0)
    both = LoraWeights.compose([(x, 0.5), (y, 2.0)])
    for site in x.modules:
        delta = lambda w, s: w.scale * w.modules[s][1] @ w.modules[s][0]  # noqa: E731
        expected = 0.5 * delta(x, site) + 2.0 * delta(y, site)
        assert torch.allclose(delta(both, site), expected, atol=1e-6)


def test_slot_load_refuses_oversized_or_foreign_adapters(tiny_model_dirs):
    path, hf = tiny_model_dirs["llama"]
    model = load_model(path, torch.float32, "cpu")
    _, big = peft_adapter(hf, "llama", seed=1, rank=16)
    slots = AdapterSlots(model, num_slots=1, max_rank=8, targets=("q_proj",), dtype=torch.float32)
    with pytest.raises(ValueError, match="rank 16 exceeds"):
        slots.load(0, big)
    _, small = peft_adapter(hf, "llama", seed=1, rank=4)
    with pytest.raises(ValueError, match="does not adapt"):
        slots.load(0, small)
