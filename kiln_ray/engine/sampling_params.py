"""SamplingParams: how one request picks its tokens and when it stops (token level; stop
strings are text and live in the ingress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln_ray.engine.guide import Guide


# Temperatures below this sample greedily: dividing logits by a smaller one overflows float32
# (1e-300 turns every logit into +-inf), and the distribution is argmax long before (vLLM's rule).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Defaults give OpenAI semantics. temperature 0 (or below GREEDY_BELOW_TEMPERATURE) means
    greedy.

    Logprobs, when asked for (`logprobs` = number of alternatives, 0 = the chosen token only),
    are log-softmax of the logits after logit_bias, a guide's mask, penalties and temperature,
    before top-k / top-p / min-p truncation (greedy requests: temperature 1).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    n: int = 1
    guide: Guide | None = None  # keep the output inside a grammar (kiln_ray/engine/guide.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1 (None disables it)")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_truncation(self) -> bool:
        return self.top_k is not None or self.top_p < 1 or self.min_p > 0
