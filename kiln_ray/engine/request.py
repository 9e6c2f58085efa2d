"""Request: one sequence being generated, and what the engine reports about it each step."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kiln_ray.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence: prompt tokens, generated tokens, and how many of them are in the KV cache.

    Prefill and decode are the same thing here: each step the scheduler lets
    `num_computed_tokens` catch up with `num_tokens`; when it does, the step's last logits are
    sampled and one more token is appended. A request created with `n > 1` is sequence 0 of a
    group; its siblings (`index` 1..n-1) wait in `pending_siblings` until sequence 0 has
    prefilled the prompt, then share its KV blocks (see LLMEngine).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        cache_key: str | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
    ):
        self.request_id = request_id
        self.index = index
        self.seq_id = f"{request_id}#{index}"
        self.params = params
        self.cache_key = cache_key  # prefix-cache namespace: KV is only shared within one key
        self.stop_token_ids = stop_token_ids  # EOS (unless ignore_eos) + params.stop_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.status = RequestStatus.WAITING
        self.state_slot: int | None = None
        self.pending_siblings: list[Request] = []
        self.adapter = None  # the AdapterManager entry this sequence pinned, if any
        self.generator: torch.Generator | None = None
        self.guide = None  # a GuideState when params.guide is set (LLMEngine.add_request)
        if params.seed is not None:
            # Sibling i of a seeded group samples with seed + i (documented API behaviour).
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def __repr__(self) -> str:
        return (
            f"Request({self.seq_id}, {self.status.value}, computed={self.num_computed_tokens}/{self.num_tokens})"
        )


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one step produced for one sequence: new tokens since the last output."""

    request_id: str
    index: int
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
