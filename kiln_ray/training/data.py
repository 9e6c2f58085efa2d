"""Training data: chat examples -> token ids with loss masks, GRPO groups, and packing.

The ingress turns a training request into `TokenizedExample`s here (DESIGN.md section 3, step 1):
`sft_example` masks the assistant turns of a conversation, `grpo_group` masks sampled
completions and attaches their group-relative advantages. The trainer concatenates examples
with `pack` into one flat varlen batch whose targets are already shifted by one token.
Plain Python over a transformers tokenizer, plus torch for the packed tensors.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kiln_ray.api.chat import ChatFormatError, render_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

END_OF_TURN_TOKEN = "<|im_end|>"  # ChatML's end of turn (SmolLM2, Qwen)
_SFT_ROLES = frozenset({"system", "user", "assistant"})


class TrainingDataError(ValueError):
    """A training example cannot be tokenized as requested (a client error)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence.

    `loss_mask[t]` True means token t is a target: the model is trained to predict
    `input_ids[t]` from `input_ids[:t]`. Both lists have the same length; `loss_mask[0]` has
    no effect, since the first token has nothing to be predicted from.
    """

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"{len(self.input_ids)} ids but {len(self.loss_mask)} mask entries")

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class GroupBatch:
    """The completions sampled for one prompt, each with its reward and advantage.

    `examples[i]` is prompt + completion i (mask on the completion), `advantages[i]` its
    group-relative advantage. `degenerate` is True when all rewards are equal: every
    advantage is then exactly 0.0 and the group contributes no policy gradient.
    """

    examples: list[TokenizedExample]
    advantages: list[float]
    rewards: list[float]
    degenerate: bool


@dataclass(frozen=True)
class PackedBatch:
    """Examples concatenated into one flat sequence of T tokens for a varlen model.

    Targets are pre-shifted: the hidden state at flat position t predicts `targets[t]`, and
    `target_mask[t]` says whether that prediction is trained. Per-example values (e.g. GRPO
    advantages) reach tokens as `values[example_index]`.
    """

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, restarting at 0 for each example
    targets: torch.Tensor  # (T,) int64, next token in the same example; 0 where there is none
    target_mask: torch.Tensor  # (T,) bool
    seq_lens: list[int]
    example_index: torch.Tensor  # (T,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the token that ends an assistant turn: `<|im_end|>`, else the EOS token."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise TrainingDataError("the tokenizer has neither <|im_end|> nor an EOS token to end a turn")
    return int(token_id)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def sft_example(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_len: int | None = None
) -> TokenizedExample:
    """A conversation -> its chat-template ids, masked on what the assistant said.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...], with at least
    one assistant message and an assistant message last. The mask is True exactly on each
    assistant message's content tokens and its end-of-turn token (`<|im_end|>`), never on role
    headers, template scaffolding (e.g. Qwen3's empty `<think></think>` block), the newline
    after `<|im_end|>`, or system/user tokens:

        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
        ------------------------------------------------------ ++++++++++++++++ -

    The ids are built by rendering growing prefixes of the chat, each a token-prefix of the
    next: messages[:i] with the generation prompt (the context the model saw), then
    messages[:i+1] (the context plus its answer). A template that renders a turn differently
    once later messages follow breaks that and raises TrainingDataError: Qwen3 renders the
    last assistant turn after an empty `<think>` block and drops that block once a user turn
    follows, so a Qwen3 conversation with two assistant turns has no single sequence that
    matches what the model saw at each turn (send one assistant turn per example; single-turn
    Qwen3 examples work). A template that does not render the assistant content verbatim
    before `<|im_end|>` (Qwen3 reformats `<think>` reasoning inside content) raises too.

    Content that starts with whitespace the tokenizer merges into the end of the generation
    prompt (SmolLM2: a leading blank line) also breaks the token-prefix property and raises;
    a token straddling scaffold and content inside the answer is counted as content.
    Raises TrainingDataError for malformed messages, a broken prefix property, or more than
    `max_len` tokens (SFT examples are never truncated: a cut conversation teaches nothing).
    """
    _check_sft_messages(messages)
    if max_len is not None:  # one render of the whole chat first: the per-turn renders cost O(turns²)
        total = len(_render(tokenizer, messages, add_generation_prompt=False))
        if total > max_len:
            raise TrainingDataError(f"the example has {total} tokens, more than max_len={max_len}")
    eot_id = end_of_turn_id(tokenizer)
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    rendered = "nothing"  # what input_ids holds the rendering of
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        prompt_name, full_name = f"messages[:{index}] + generation prompt", f"messages[:{index + 1}]"
        _require_prefix(tokenizer, input_ids, rendered, prompt, prompt_name)
        _require_prefix(tokenizer, prompt, prompt_name, full, full_name)
        loss_mask += [False] * (len(prompt) - len(input_ids))
        loss_mask += _answer_mask(tokenizer, full[len(prompt) :], message["content"], eot_id, index)
        input_ids, rendered = full, full_name  # the last one renders all messages: its length was checked
    return TokenizedExample(input_ids=input_ids, loss_mask=loss_mask)


def _check_sft_messages(messages: list[dict]) -> None:
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _SFT_ROLES:
            raise TrainingDataError(f"message {index}: role must be system, user or assistant, not {role!r}")
        if not isinstance(message.get("content"), str):
            raise TrainingDataError(f"message {index}: content must be a string")
        if message.get("tool_calls"):
            raise TrainingDataError(f"message {index}: tool calls are not supported in SFT examples")
    if not any(message["role"] == "assistant" for message in messages):
        raise TrainingDataError("an SFT example needs at least one assistant message")
    if messages[0]["role"] == "assistant":
        raise TrainingDataError("the first message cannot be the assistant's: it needs a prompt")
    if messages[-1]["role"] != "assistant":
        raise TrainingDataError("the last message of an SFT example must be the assistant's")


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool
) -> list[int]:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except ChatFormatError as error:
        raise TrainingDataError(str(error)) from error


def _require_prefix(
    tokenizer: PreTrainedTokenizerBase, prefix: list[int], prefix_name: str, ids: list[int], ids_name: str
) -> None:
    if ids[: len(prefix)] == prefix:
        return
    prefix_text, text = _decode(tokenizer, prefix), _decode(tokenizer, ids)
    if text.startswith(prefix_text):
        raise TrainingDataError(
            f"the tokens of {ids_name} do not start with the tokens of {prefix_name} although the text "
            "does: the tokenizer merges characters across the turn boundary (e.g. assistant content "
            "that starts with a blank line); strip the content's leading whitespace"
        )
    raise TrainingDataError(
        f"the chat template's rendering of {ids_name} does not start with its rendering of "
        f"{prefix_name}: the template rewrites earlier turns (as Qwen3 drops the <think> block "
        "of an assistant turn once a user turn follows), so no single sequence holds every "
        "assistant turn as the model saw it; with this template send one assistant turn per example"
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _answer_mask(
    tokenizer: PreTrainedTokenizerBase, answer: list[int], content: str, eot_id: int, index: int
) -> list[bool]:
    """Mask for the tokens one assistant turn adds: [scaffold][content][<|im_end|>][trailer].

    Only content and <|im_end|> are targets. The content is found by decoding: the first
    content token is the last k for which decode(answer[k:end]) still ends with the content.
    """
    if eot_id not in answer:
        raise TrainingDataError(
            f"assistant message {index}: the template does not end it with {END_OF_TURN_TOKEN}"
        )
    end = len(answer) - 1 - answer[::-1].index(eot_id)

    def text(start: int) -> str:
        return _decode(tokenizer, answer[start:end])

    if not text(0).endswith(content):
        raise TrainingDataError(
            f"assistant message {index}: the template does not render its content verbatim before "
            f"{END_OF_TURN_TOKEN} (e.g. Qwen3 reformats <think> reasoning), so it cannot be masked"
        )
    start = 0
    while start < end and text(start + 1).endswith(content):
        start += 1
    return [False] * start + [True] * (end + 1 - start) + [False] * (len(answer) - end - 1)


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: list[float], eps: float = 1e-4) -> list[float]:
    """Group-relative advantages: (r - mean) / (std + eps), population std over the group.

    A group whose rewards are all equal gets exactly 0.0 everywhere (no float residue from the
    mean), so it contributes nothing to the policy gradient. Any finite rewards work, up to
    +-1.8e308: they are divided by the largest |reward| first (advantages do not change with
    the scale, given eps / scale), so neither the mean's sum nor the squares overflow.
    """
    if not rewards:
        raise TrainingDataError("a group needs at least one reward")
    if all(reward == rewards[0] for reward in rewards):
        return [0.0] * len(rewards)
    scale = max(abs(reward) for reward in rewards)
    unit = [reward / scale for reward in rewards]  # in [-1, 1]
    mean = statistics.fmean(unit)
    std = statistics.pstdev(unit)
    return [(u - mean) / (std + eps / scale) for u in unit]


def grpo_group(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], completions: list[str], rewards: list[float]
) -> GroupBatch:
    """One prompt and its sampled completions -> masked examples with advantages.

    Each example is render_chat(messages, add_generation_prompt=True) followed by the
    completion's ids (tokenized without special tokens) and `<|im_end|>`, which is where the
    model's answer ended. The mask is True exactly on the completion ids and that `<|im_end|>`.
    """
    if not completions:
        raise TrainingDataError("a GRPO group needs at least one completion")
    if len(completions) != len(rewards):
        raise TrainingDataError(f"{len(completions)} completions but {len(rewards)} rewards")
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    eot_id = end_of_turn_id(tokenizer)
    examples = []
    for completion in completions:
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eot_id]
        examples.append(
            TokenizedExample(
                input_ids=prompt + completion_ids,
                loss_mask=[False] * len(prompt) + [True] * len(completion_ids),
            )
        )
    advantages = group_advantages(rewards)
    return GroupBatch(
        examples=examples,
        advantages=advantages,
        rewards=[float(reward) for reward in rewards],
        degenerate=all(advantage == 0.0 for advantage in advantages),
    )


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def pack(examples: list[TokenizedExample]) -> PackedBatch:
    """Concatenate examples into one flat varlen batch with next-token targets.

    Targets never cross an example boundary. Two examples, "a b c d" (targets c, d) and
    "e f g" (targets f, g):

        flat t         0    1    2    3  |  4    5    6
        input_ids      a    b    c    d  |  e    f    g
        positions      0    1    2    3  |  0    1    2
        loss_mask      F    F    T    T  |  F    T    T     per example: which tokens are targets
        targets        b    c    d    0  |  f    g    0     input_ids[t+1] in the same example
        target_mask    F    T    T    F  |  T    T    F     loss_mask[t+1]; False at each last token

    The hidden state at t is scored against targets[t] where target_mask[t]. A last token has
    no next token: its target holds 0 (any valid id, so it can be gathered) and is masked.
    """
    if not examples:
        raise ValueError("pack needs at least one example")
    seq_lens = [len(example.input_ids) for example in examples]
    if min(seq_lens) == 0:
        raise ValueError("cannot pack an empty example")
    input_ids, targets, positions, example_index = [], [], [], []
    target_mask: list[bool] = []
    for index, example in enumerate(examples):
        input_ids += example.input_ids
        targets += example.input_ids[1:] + [0]
        target_mask += example.loss_mask[1:] + [False]
        positions += range(len(example.input_ids))
        example_index += [index] * len(example.input_ids)
    return PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
        target_mask=torch.tensor(target_mask, dtype=torch.bool),
        seq_lens=seq_lens,
        example_index=torch.tensor(example_index, dtype=torch.int64),
    )
