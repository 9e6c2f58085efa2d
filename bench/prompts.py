"""Benchmark prompts of an exact token count, as token ids (in-process paths) and as text
(HTTP servers), the same prompts for every system.

A prompt is a random sequence of whole-word tokens (" the", " house", ...). Each such token is
its own pre-tokenizer piece, so the text re-tokenizes to exactly the same ids with the model's
tokenizer, and to the same count with any faithful port of it (llama.cpp's); `build` checks the
round trip. Prompts are random so that no prefix cache turns a prefill into a hit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str


class PromptBuilder:
    """Draws prompts from the tokenizer's whole-word tokens; deterministic per seed."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.words = self._whole_word_tokens()

    def _whole_word_tokens(self) -> list[int]:
        words = []
        for token, token_id in self.tokenizer.get_vocab().items():
            text = self.tokenizer.convert_tokens_to_string([token])
            if len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
                if self.encode(text) == [token_id]:
                    words.append(token_id)
        if len(words) < 1000:
            raise RuntimeError(f"only {len(words)} whole-word tokens in this tokenizer")
        return sorted(words)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, n: int, length: int, seed: int) -> list[Prompt]:
        """`n` prompts of exactly `length` tokens each."""
        rng = random.Random(seed)
        prompts = []
        for _ in range(n):
            ids = [rng.choice(self.words) for _ in range(length)]
            text = self.tokenizer.decode(ids)
            if self.encode(text) != ids:
                raise RuntimeError(f"prompt text does not re-tokenize to its {length} ids (seed {seed})")
            prompts.append(Prompt(ids, text))
        return prompts
