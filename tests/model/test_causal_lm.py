"""CausalLM against transformers: same weights, same tokens -> same logits (fp32).

Tolerance: max |ours - transformers| / std(transformers logits) < 1e-4, for a dense prefill of
several packed sequences, a paged prefill in chunks interleaved with decodes, and
token-by-token decode, with the fast and the reference kernels.
"""

import pytest
import torch

from kernels.attention import AttentionMetadata
from kernels.dispatch import select_kernels
from kiln_ray.model.context import ForwardContext, LayerCaches, StateMetadata
from kiln_ray.model.layers import Linear
from kiln_ray.model.loader import load_model
from tests.helpers import rel_rms
from tests.model.tiny import VARIANTS

TOL = 1e-4
SEQ_LENS = [1, 7, 19, 45]


def rel_max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.std()).item()


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=g) for n in SEQ_LENS]


def reference_logits(hf_model, sequences):
    with torch.no_grad():
        return [hf_model(s[None]).logits[0] for s in sequences]


class PagedHarness:
    """Runs a model in serving mode over a fixed set of sequences, each with its own
    contiguous run of KV blocks and its own state slot: the model-level contract, without
    the scheduler."""

    def __init__(self, model, num_seqs: int, max_len: int, block_size: int = 4):
        cfg = model.config
        self.model, self.bs = model, block_size
        blocks_per_seq = -(-max_len // block_size)
        kv_shape = (num_seqs * blocks_per_seq + 3, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.caches = LayerCaches(
            kv=[(torch.zeros(kv_shape), torch.zeros(kv_shape)) for _ in range(cfg.num_full_attention_layers)],
            conv=[torch.zeros(num_seqs + 2, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1)
                  for _ in range(cfg.num_linear_attention_layers)],
            recurrent=[torch.zeros(num_seqs + 2, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                   cfg.linear_value_head_dim) for _ in range(cfg.num_linear_attention_layers)],
        )
        # Interleave sequences' blocks (and skip block 0) so tables are not trivially contiguous.
        self.tables = [[3 + i + num_seqs * j for j in range(blocks_per_seq)] for i in range(num_seqs)]
        self.slots = [num_seqs + 1 - i for i in range(num_seqs)]
        self.computed = [0] * num_seqs

    def step(self, work: list[tuple[int, torch.Tensor]], lora=None) -> list[torch.Tensor]:
        """work: (sequence index, its next tokens), decodes (1 token) first. Returns the
        logits of every new token, per entry."""
        ids, pos, slots_map, qlens, ctxs, tables, state_slots = [], [], [], [], [], [], []
        for seq, tokens in work:
            start = self.computed[seq]
            n = len(tokens)
            ids.append(tokens)
            pos.extend(range(start, start + n))
            slots_map.extend(self.tables[seq][p // self.bs] * self.bs + p % self.bs for p in range(start, start + n))
            qlens.append(n)
            ctxs.append(start + n)
            tables.append(self.tables[seq])
            state_slots.append(self.slots[seq])
            self.computed[seq] += n
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        ctx = ForwardContext(
            cu_seqlens=cu,
            caches=self.caches,
            attention=AttentionMetadata.build(qlens, ctxs, tables, torch.tensor(slots_map), self.bs, torch.device("cpu")),
            states=StateMetadata(torch.tensor(state_slots), sum(1 for n in qlens if n == 1)),
            lora=lora,
        )
        with torch.no_grad():
            logits = self.model.compute_logits(self.model(torch.cat(ids), torch.tensor(pos), ctx))
        return [logits[cu[i]:cu[i + 1]] for i in range(len(work))]


@pytest.mark.parametrize("arch", VARIANTS)
def test_dense_prefill_matches_transformers(arch, tiny_model_dirs, sequences):
    path, hf = tiny_model_dirs[arch]
    model = load_model(path, torch.float32, "cpu", select_kernels("cpu", "fast"))
    refs = reference_logits(hf, sequences)
    with torch.no_grad():
        hidden = model(torch.cat(sequences), torch.cat([torch.arange(len(s)) for s in sequences]),
                       ForwardContext.dense([len(s) for s in sequences]))
        logits = model.compute_logits(hidden)
    start = 0
    for s, ref in zip(sequences, refs):
        assert rel_max_err(logits[start:start + len(s)], ref) < TOL
        start += len(s)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("arch", VARIANTS)
def test_chunked_prefill_and_decode_match_transformers(arch, kernels, tiny_model_dirs, sequences):
    """Prefill each sequence in chunks of 8 while the others decode, then decode token by
    token; every token's logits equal transformers' over the full sequence."""
    path, hf = tiny_model_dirs[arch]
    model = load_model(path, torch.float32, "cpu", select_kernels("cpu", kernels))
    refs = reference_logits(hf, sequences)
    harness = PagedHarness(model, len(sequences), max(SEQ_LENS))
    got = [[] for _ in sequences]
    chunk = 8
    while any(harness.computed[i] < len(s) for i, s in enumerate(sequences)):
        decodes, prefills = [], []
        for i, s in enumerate(sequences):
            done = harness.computed[i]
            if done >= len(s):
                continue
            if done >= 12 or len(s) - done == 1:  # past its "prompt": decode one token a step
                decodes.append((i, s[done:done + 1]))
            else:
                prefills.append((i, s[done:min(done + chunk, 12, len(s))]))
        work = decodes + prefills
        for (i, _), logits in zip(work, harness.step(work)):
            got[i].append(logits)
    for i, ref in enumerate(refs):
        ours = torch.cat(got[i])
        assert ours.shape == ref.shape
        assert rel_max_err(ours, ref) < TOL, f"sequence {i} (length {len(sequences[i])})"


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_bf16_paths_stay_close_to_fp32(arch, tiny_model_dirs, sequences, monkeypatch):
    """bf16 with plain projections (the AMX kernel where the CPU has one), with oneDNN-packed
    ones, and under autograd (which must bypass the packed copies) are no further from the fp32
    logits than transformers' own bf16 run is (tiny random models amplify bf16 rounding to a
    few percent)."""
    from kernels.linear import prepack_available

    if not prepack_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN prepacking is not available in this torch build")
    path, hf = tiny_model_dirs[arch]
    ids = torch.cat(sequences)
    pos = torch.cat([torch.arange(len(s)) for s in sequences])
    import copy

    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        hf_logits = torch.cat([hf_bf16(s[None]).logits[0].float() for s in sequences])

    def logits(model):
        return model.compute_logits(model(ids, pos, ForwardContext.dense([len(s) for s in sequences])))

    with torch.no_grad():
        fp32 = logits(load_model(path, torch.float32, "cpu"))
        plain = logits(load_model(path, torch.bfloat16, "cpu"))
        packed_model = load_model(path, torch.bfloat16, "cpu")
        packed_model.prepack()
        packed = logits(packed_model)
    import kernels.linear

    def no_packed(*args):
        raise AssertionError("packed weights used under autograd")

    monkeypatch.setattr(kernels.linear, "packed_linear", no_packed)
    with torch.enable_grad():
        grad_mode = logits(packed_model)
    budget = 1.25 * rel_rms(hf_logits, fp32)
    for name, out in (("plain", plain), ("packed", packed), ("autograd", grad_mode)):
        assert rel_rms(out, fp32) < budget, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3_5"])
def test_amx_projections_give_the_logits_of_f_linear(arch, tiny_model_dirs, sequences, monkeypatch):
    """bf16 without grad on an AMX CPU: every projection and the output head (tied for llama,
    with q/k/v bias for qwen2, the small linear-attention projections of qwen3_5) run on the
    AMX kernel over the plain weights, and the logits are those of F.linear to bf16 rounding."""
    import kernels.linear

    if not kernels.linear.amx_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no AMX here")
    path, _ = tiny_model_dirs[arch]
    model = load_model(path, torch.bfloat16, "cpu")
    ids = torch.cat(sequences)
    pos = torch.cat([torch.arange(len(s)) for s in sequences])

    def logits():
        with torch.no_grad():
            return model.compute_logits(model(ids, pos, ForwardContext.dense([len(s) for s in sequences])))

    took = []
    amx_linear = kernels.linear.amx_linear

    def counted(x, weight, bias):
        out = amx_linear(x, weight, bias)
        took.append(out is not None)
        return out

    monkeypatch.setattr(kernels.linear, "amx_linear", counted)
    fast = logits()
    projections = sum(isinstance(m, Linear) for m in model.modules()) + (model.lm_head is None)
    assert took == [True] * projections
    for kernel in ("amx_linear", "avx512_linear"):  # both refuse: F.linear
        monkeypatch.setattr(kernels.linear, kernel, lambda x, weight, bias: None)
    reference = logits()
    with torch.no_grad():
        fp32 = load_model(path, torch.float32, "cpu")
        exact = fp32.compute_logits(fp32(ids, pos, ForwardContext.dense([len(s) for s in sequences])))
    # a tenth of bf16's own error: the two differ at most by a rounding here and there
    assert rel_rms(fast, reference) < 0.1 * rel_rms(reference, exact)
