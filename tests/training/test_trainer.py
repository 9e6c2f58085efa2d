"""Trainer: LoRA steps on a frozen model — the loss falls, jobs continue where the last one
stopped, GRPO moves probability towards rewarded completions, and on the real default model
one correction is learned while unrelated answers stay the same."""

from dataclasses import replace

import pytest
import torch

from kiln_ray.model.context import ForwardContext
from kiln_ray.model.loader import load_model
from kiln_ray.model.lora import TrainableLora, lora_sites
from kiln_ray.training.data import TokenizedExample, grpo_group, pack
from kiln_ray.training.losses import token_logprobs
from kiln_ray.training.trainer import JobCancelled, Trainer, TrainConfig, TrainingDiverged
from tests.training.probes import FACTS, UNRELATED, greedy_answers, one_thread


def example(ids, n_answer):
    return TokenizedExample(list(ids), [False] * (len(ids) - n_answer) + [True] * n_answer)


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_model(tiny_model_dirs["qwen3"][0], torch.float32, "cpu")


EXAMPLES = [example([5, 9, 13, 17, 21, 40, 41, 42, 43], 4), example([7, 8, 60, 61, 62], 3)]
CFG = TrainConfig(learning_rate=1e-2, steps=6, early_stop_loss=None, replay_per_step=0, lora_rank=4, lora_alpha=8)


def test_sft_loss_falls_and_only_lora_changes(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = Trainer(tiny).run_sft(EXAMPLES, CFG)
    assert result.steps == 6
    assert result.losses[-1] < 0.5 * result.losses[0]
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert any(b.abs().sum() > 0 for _, b in result.weights.modules.values())


def test_the_same_job_trains_the_same_adapter_whatever_the_global_rng(tiny):
    """A fresh adapter's A matrices come from the job's seed, not torch's global generator."""
    torch.manual_seed(1)
    first = Trainer(tiny).run_sft(EXAMPLES, CFG).weights
    torch.manual_seed(2)
    again = Trainer(tiny).run_sft(EXAMPLES, CFG).weights
    other = Trainer(tiny).run_sft(EXAMPLES, replace(CFG, seed=CFG.seed + 1)).weights
    for key, (a, b) in first.modules.items():
        assert torch.equal(a, again.modules[key][0]) and torch.equal(b, again.modules[key][1]), key
    assert any(not torch.equal(a, other.modules[key][0]) for key, (a, _) in first.modules.items())


def test_sft_trains_a_hybrid_model_through_its_linear_attention_layers(tiny_model_dirs):
    """Qwen3.5 (Kiln's model family): gradients flow back through the gated-delta-net layers'
    chunked rule and conv, into LoRA on their own projections as well as the MLPs."""
    from kiln_ray.model.lora import DEFAULT_TARGETS, LINEAR_ATTENTION_TARGETS

    hybrid = load_model(tiny_model_dirs["qwen3_5"][0], torch.float32, "cpu")
    cfg = replace(CFG, targets=DEFAULT_TARGETS + LINEAR_ATTENTION_TARGETS)
    result = Trainer(hybrid).run_sft(EXAMPLES, cfg)
    assert result.losses[-1] < 0.5 * result.losses[0]
    trained = {name for (_, name), (_, b) in result.weights.modules.items() if b.abs().sum() > 0}
    assert set(LINEAR_ATTENTION_TARGETS) <= trained, trained


@pytest.mark.parametrize("overrides", [{"lora_alpha": 1e30}, {"lora_alpha": 1e308}], ids=["alpha-1e30", "alpha-1e308"])
def test_a_diverging_job_raises_instead_of_returning_nan_weights(tiny, overrides):
    """A huge lora_alpha (the API accepts any positive number) overflows float32: the job must
    fail, not publish an adapter whose NaN logits every request on it would then carry."""
    published = []
    with pytest.raises(TrainingDiverged, match="diverged"):
        Trainer(tiny).run_sft(EXAMPLES, replace(CFG, publish_every=1, **overrides),
                              on_publish=lambda weights, step: published.append(weights))
    for weights in published:  # what was published before the divergence is still finite
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in weights.modules.values())


def test_a_job_continues_from_the_last_version_unless_from_scratch(tiny):
    trainer = Trainer(tiny)
    cfg3 = TrainConfig(**{**CFG.__dict__, "steps": 3})
    first = trainer.run_sft(EXAMPLES, cfg3)
    second = trainer.run_sft(EXAMPLES, cfg3, start=first.weights, optimizer_state=first.optimizer_state)
    fresh = trainer.run_sft(EXAMPLES, TrainConfig(**{**cfg3.__dict__, "from_scratch": True}), start=first.weights)
    assert second.losses[0] < first.losses[-1] * 1.1  # picks up where the first job ended
    assert fresh.losses[0] > second.losses[0]  # from scratch forgets what the first job taught


def test_resume_equals_an_uninterrupted_run(tiny):
    """3 steps, save, 3 more from the saved weights + AdamW moments == 6 steps in one go."""
    trainer = Trainer(tiny)
    torch.manual_seed(1)
    start = trainer.run_sft(EXAMPLES, TrainConfig(**{**CFG.__dict__, "steps": 1, "learning_rate": 0.0})).weights
    cfg3 = TrainConfig(**{**CFG.__dict__, "steps": 3})
    cfg6 = TrainConfig(**{**CFG.__dict__, "steps": 6})
    one_go = trainer.run_sft(EXAMPLES, cfg6, start=start)
    part1 = trainer.run_sft(EXAMPLES, cfg3, start=start)
    part2 = trainer.run_sft(EXAMPLES, cfg3, start=part1.weights, optimizer_state=part1.optimizer_state)
    assert part1.losses + part2.losses == pytest.approx(one_go.losses, rel=1e-4)
    for site, (a, b) in one_go.weights.modules.items():
        assert torch.allclose(part2.weights.modules[site][1], b, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_step(tiny):
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 2})
    torch.manual_seed(3)
    start = Trainer(tiny).run_sft(EXAMPLES, TrainConfig(**{**CFG.__dict__, "steps": 1, "learning_rate": 0.0})).weights
    with_ckpt = Trainer(tiny, gradient_checkpointing=True).run_sft(EXAMPLES, cfg, start=start)
    without = Trainer(tiny, gradient_checkpointing=False).run_sft(EXAMPLES, cfg, start=start)
    assert with_ckpt.losses == pytest.approx(without.losses, rel=1e-5)


def test_cancel_stops_the_job(tiny):
    calls = []
    with pytest.raises(JobCancelled):
        Trainer(tiny).run_sft(EXAMPLES, CFG, on_step=calls.append, should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_publish_every_k_steps(tiny):
    published = []
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 7, "publish_every": 3})
    Trainer(tiny).run_sft(EXAMPLES, cfg, on_publish=lambda w, step: published.append(step))
    assert published == [3, 6]


class _Tok:
    """Just enough tokenizer for grpo_group: text -> ids by characters."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 200) for c in text]}


def test_grpo_moves_probability_to_the_rewarded_completion(tiny, monkeypatch):
    import kiln_ray.training.data as data

    monkeypatch.setattr(data, "render_chat", lambda tok, messages, *a, **k: [10, 11, 12, 13])
    monkeypatch.setattr(data, "end_of_turn_id", lambda tok: 2)
    group = grpo_group(_Tok(), [{"role": "user", "content": "q"}], ["yes", "no!", "maybe"], [1.0, 0.0, 0.0])
    degenerate = grpo_group(_Tok(), [{"role": "user", "content": "q"}], ["a", "b"], [0.5, 0.5])
    trainer = Trainer(tiny)
    cfg = TrainConfig(learning_rate=5e-3, steps=8, lora_rank=4, lora_alpha=8, kl_coeff=0.01)
    result = trainer.run_grpo([group, degenerate], cfg)
    assert any("equal rewards" in n for n in result.notes)

    def seq_logprob(weights, ex):
        batch = pack([ex])
        lora = None
        if weights is not None:
            lora = TrainableLora(lora_sites(tiny, cfg.targets), weights.rank, weights.alpha, init=weights)
        with torch.no_grad():
            hidden = tiny(batch.input_ids, batch.positions, ForwardContext.dense(batch.seq_lens, lora=lora))
            lp = token_logprobs(hidden, tiny.embed_tokens, batch.targets)
        return lp[batch.target_mask].sum().item()

    good, bad = group.examples[0], group.examples[1]
    gain_good = seq_logprob(result.weights, good) - seq_logprob(None, good)
    gain_bad = seq_logprob(result.weights, bad) - seq_logprob(None, bad)
    assert gain_good > 0 > gain_bad


def test_only_degenerate_groups_train_nothing(tiny, monkeypatch):
    import kiln_ray.training.data as data

    monkeypatch.setattr(data, "render_chat", lambda tok, messages, *a, **k: [10, 11])
    monkeypatch.setattr(data, "end_of_turn_id", lambda tok: 2)
    group = grpo_group(_Tok(), [{"role": "user", "content": "q"}], ["a", "b"], [1.0, 1.0])
    result = Trainer(tiny).run_grpo([group], CFG)
    assert result.steps == 0 and result.notes


# -- the real default model (SmolLM2-135M-Instruct, bf16) --------------------------------------

@pytest.fixture(scope="module")
def smol(default_model_dir):
    from kiln_ray.model.registry import load_tokenizer

    return load_model(default_model_dir, torch.bfloat16, "cpu"), load_tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def first_correction(smol):
    """The default SFT job (TrainConfig()) on one fictional correction, trained once for the
    tests below."""
    from kiln_ray.training.data import sft_example

    model, tok = smol
    question, answer = FACTS[0]
    ex = sft_example(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    with one_thread():
        return ex, Trainer(model).run_sft([ex], TrainConfig())


@pytest.mark.real_model
@pytest.mark.slow
def test_the_default_job_learns_one_correction_and_keeps_unrelated_facts(smol, first_correction):
    """One fictional correction with the default job: the corrected answer comes out word for
    word (greedy), the job stops early once its loss is low, and unrelated questions keep
    their facts. Their wording does not stay identical: measured step by step (bf16), the
    first answers change from step 2 on (shorter, as the one example is), while the
    correction is learned only from step 8, so no step budget or early-stop threshold
    gives both. Mixing the base model's own answers to other prompts into each step did not
    keep the wording either (bench/forgetting.py; bench/RESULTS.md). So the test asserts the
    facts, not the base model's wording."""
    _, result = first_correction
    assert result.stopped_early and result.steps < TrainConfig().steps
    question, correction = FACTS[0]
    questions = [question] + [q for q, _ in UNRELATED]
    answers = greedy_answers(smol, questions, {"fix": result.weights})
    assert correction not in answers[(None, question)]  # the base model gets it wrong
    assert answers[("fix", question)] == correction
    for q, fact in UNRELATED:
        assert fact in answers[("fix", q)], (q, answers[(None, q)], answers[("fix", q)])


@pytest.mark.real_model
@pytest.mark.slow
def test_replay_keeps_earlier_corrections_on_the_real_model(smol, first_correction):
    """Two more fictional facts taught into the same adapter after the first, each job
    replaying one earlier example per step: all three are still answered, and an unrelated
    answer keeps its fact (SmolLM2-135M, bf16)."""
    from kiln_ray.training.data import sft_example

    model, tok = smol
    first, result = first_correction
    trainer, weights, state, pool = Trainer(model), result.weights, result.optimizer_state, [first]
    for question, fact in FACTS[1:]:
        ex = sft_example(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": fact}])
        with one_thread():
            result = trainer.run_sft([ex], TrainConfig(), start=weights, optimizer_state=state, replay=list(pool))
        weights, state = result.weights, result.optimizer_state
        pool.append(ex)
    questions = [q for q, _ in FACTS] + ["What do bees make?"]
    answers = greedy_answers(smol, questions, {"facts": weights}, max_tokens=20, base=False)
    for question, fact in FACTS:
        assert fact.split(" is ")[-1].rstrip(".").split(" by ")[-1] in answers[("facts", question)]
    assert "honey" in answers[("facts", "What do bees make?")].lower()
