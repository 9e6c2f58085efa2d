"""Trainer: LoRA training steps on a frozen CausalLM (the same weights the engine serves).

    run_sft   each step: the job's examples + a sample of the adapter's earlier examples
              (replay, so a new correction does not erase old ones), cross-entropy on
              assistant tokens, AdamW on the LoRA parameters, gradient clipping; stops early
              once the loss on the job's own examples is low enough
    run_grpo  groups of completions with rewards: group-normalised advantages, per-token
              importance ratio against the policy at the start of the job (clipped), KL to
              the base model (the same model with the adapter switched off), token-mean loss

A job continues from the adapter's latest version (and its optimizer state) unless it asks
for a fresh one. Plain Python + torch: the trainer actor wraps it.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.context import ForwardContext
from kiln_ray.model.lora import DEFAULT_TARGETS, LoraWeights, TrainableLora, lora_sites
from kiln_ray.training.data import GroupBatch, TokenizedExample, pack
from kiln_ray.training.losses import grpo_loss, sft_loss, token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Per job. The defaults learn one short correction without damaging other answers
    (measured on SmolLM2-135M: lr 3e-4 for ~12 steps; lr 1e-3 x 20 steps broke unrelated
    answers)."""

    learning_rate: float = 3e-4
    steps: int = 12  # optimizer steps
    epochs: int | None = None  # Kiln's name for it: each step sees every example, so epochs = steps
    lora_rank: int = 16
    lora_alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    from_scratch: bool = False
    replay_per_step: int = 1  # earlier examples mixed into each step (0 disables replay)
    early_stop_loss: float | None = 0.05  # stop once the job's own examples reach this loss
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    publish_every: int | None = None  # publish an intermediate version every k steps
    # GRPO
    kl_coeff: float = 0.04
    clip_epsilon: float = 0.2
    seed: int = 0


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    seconds: float
    tokens: int
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    weights: LoraWeights
    optimizer_state: bytes
    losses: list[float]
    steps: int
    stopped_early: bool = False
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)


class JobCancelled(Exception):
    """Raised inside a job when its `should_stop` callback says so."""


class TrainingDiverged(ValueError):
    """A step's loss or gradient is not finite (e.g. a huge lora_alpha or learning rate): the
    job stops before the optimizer writes NaN into the adapter, so nothing broken is published."""


@dataclass
class _Callbacks:
    on_step: Callable[[StepReport], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_publish: Callable[[LoraWeights, int], None] | None = None


class Trainer:
    def __init__(self, model: CausalLM, gradient_checkpointing: bool = True, chunk_size: int = 512):
        self.model = model
        self.gradient_checkpointing = gradient_checkpointing
        self.chunk_size = chunk_size
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens if self.model.lm_head is None else self.model.lm_head.weight

    # -- SFT -----------------------------------------------------------------------------------

    def run_sft(
        self,
        examples: list[TokenizedExample],
        config: TrainConfig,
        start: LoraWeights | None = None,
        optimizer_state: bytes | None = None,
        replay: list[TokenizedExample] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_publish: Callable[[LoraWeights, int], None] | None = None,
    ) -> TrainResult:
        if not examples:
            raise ValueError("an SFT job needs at least one example")
        lora, optimizer = self._setup(config, start, optimizer_state)
        rng = random.Random(config.seed)
        pool = list(replay or [])
        total = config.epochs or config.steps  # every step sees all of the job's examples
        losses: list[float] = []
        stopped_early = False
        cb = _Callbacks(on_step, should_stop, on_publish)
        for step in range(1, total + 1):
            self._check_cancel(cb)
            started = time.perf_counter()
            replayed = rng.sample(pool, min(config.replay_per_step, len(pool))) if pool else []
            batch = pack(examples + replayed)
            own = batch.example_index < len(examples)  # positions of this job's examples
            hidden = self._forward(batch, lora)
            loss_sum, count = sft_loss(hidden, self.head_weight, batch.targets, batch.target_mask, self.chunk_size)
            loss = loss_sum / max(count, 1)
            self._optimize(loss, lora, optimizer, config)
            own_loss = self._own_loss(hidden.detach(), batch, own, loss.item())
            losses.append(own_loss)
            self._report(cb, StepReport(step, total, own_loss, time.perf_counter() - started, batch.num_tokens,
                                        {"replayed": len(replayed)}))
            self._maybe_publish(cb, lora, config, step, total)
            if config.early_stop_loss is not None and own_loss < config.early_stop_loss:
                stopped_early = step < total
                break
        return TrainResult(lora.export(), _save_optimizer(optimizer, lora), losses, len(losses), stopped_early)

    def _own_loss(self, hidden: torch.Tensor, batch, own: torch.Tensor, overall: float) -> float:
        """Loss on the job's own examples (not the replayed ones) at this step's weights."""
        if bool(own.all()):
            return overall
        mask = batch.target_mask & own
        with torch.no_grad():
            loss_sum, count = sft_loss(hidden, self.head_weight, batch.targets, mask, self.chunk_size)
        return (loss_sum / max(count, 1)).item()

    # -- GRPO ----------------------------------------------------------------------------------

    def run_grpo(
        self,
        groups: list[GroupBatch],
        config: TrainConfig,
        start: LoraWeights | None = None,
        optimizer_state: bytes | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_publish: Callable[[LoraWeights, int], None] | None = None,
    ) -> TrainResult:
        notes = [f"group {i} has equal rewards: it contributes nothing" for i, g in enumerate(groups) if g.degenerate]
        useful = [g for g in groups if not g.degenerate]
        lora, optimizer = self._setup(config, start, optimizer_state)
        if not useful:
            return TrainResult(lora.export(), _save_optimizer(optimizer, lora), [], 0, notes=notes)
        examples = [e for g in useful for e in g.examples]
        advantages = [a for g in useful for a in g.advantages]
        batch = pack(examples)
        adv_per_token = torch.tensor(advantages, dtype=torch.float32)[batch.example_index]
        with torch.no_grad():  # the policy at the start of the job, and the base model
            old_logp = token_logprobs(self._forward(batch, lora), self.head_weight, batch.targets, self.chunk_size)
            ref_logp = token_logprobs(self._forward(batch, None), self.head_weight, batch.targets, self.chunk_size)
        cb = _Callbacks(on_step, should_stop, on_publish)
        losses: list[float] = []
        for step in range(1, config.steps + 1):
            self._check_cancel(cb)
            started = time.perf_counter()
            logp = token_logprobs(self._forward(batch, lora), self.head_weight, batch.targets, self.chunk_size)
            loss, stats = grpo_loss(logp, old_logp, ref_logp, adv_per_token, batch.target_mask,
                                    config.clip_epsilon, config.kl_coeff)
            self._optimize(loss, lora, optimizer, config)
            losses.append(loss.item())
            self._report(cb, StepReport(step, config.steps, loss.item(), time.perf_counter() - started,
                                        batch.num_tokens, stats))
            self._maybe_publish(cb, lora, config, step, config.steps)
        return TrainResult(lora.export(), _save_optimizer(optimizer, lora), losses, len(losses), notes=notes)

    # -- shared --------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """One throwaway step (the first backward pays one-time costs: ~10 s measured), so a
        user's first job does not. It leaves no trace: its adapter is discarded, the frozen
        model is unchanged, and torch's (CPU) random stream is left as it was. Returns the
        seconds it took."""
        started = time.perf_counter()
        example = TokenizedExample([1, 2, 3, 4, 5, 6], [False, False, False, True, True, True])
        with torch.random.fork_rng(devices=[]):  # the adapter init is seeded; anything else that draws is undone
            self.run_sft([example], TrainConfig(steps=1, early_stop_loss=None, replay_per_step=0))
        return time.perf_counter() - started

    def _setup(self, config: TrainConfig, start: LoraWeights | None, optimizer_state: bytes | None):
        sites = lora_sites(self.model, tuple(config.targets))
        fresh = config.from_scratch or start is None
        if fresh:
            lora = TrainableLora(sites, config.lora_rank, config.lora_alpha, seed=config.seed)
        else:
            lora = TrainableLora(sites, start.rank, start.alpha, init=start, seed=config.seed)  # seed: sites start lacks
        optimizer = torch.optim.AdamW(lora.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        if not fresh and optimizer_state is not None:
            _load_optimizer(optimizer, lora, optimizer_state, config.learning_rate)
        return lora, optimizer

    def _forward(self, batch, lora: TrainableLora | None) -> torch.Tensor:
        ctx = ForwardContext.dense(batch.seq_lens, lora=lora)
        ctx.checkpoint_layers = self.gradient_checkpointing and lora is not None and torch.is_grad_enabled()
        return self.model(batch.input_ids, batch.positions, ctx)

    @staticmethod
    def _optimize(loss: torch.Tensor, lora: TrainableLora, optimizer, config: TrainConfig) -> None:
        """One AdamW step on `loss`; raises TrainingDiverged, leaving the weights as they were,
        if the loss or the gradient norm is not finite."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the loss is {loss.item()}: training diverged (lower learning_rate or lora_alpha)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(lora.parameters(), config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm is {grad_norm.item()}: training diverged "
                                   "(lower learning_rate or lora_alpha)")
        optimizer.step()

    @staticmethod
    def _check_cancel(cb: _Callbacks) -> None:
        if cb.should_stop is not None and cb.should_stop():
            raise JobCancelled()

    @staticmethod
    def _report(cb: _Callbacks, report: StepReport) -> None:
        log.info("step %d/%d loss %.4f (%.2f s, %d tokens)", report.step, report.total_steps, report.loss,
                 report.seconds, report.tokens)
        if cb.on_step is not None:
            cb.on_step(report)

    @staticmethod
    def _maybe_publish(cb: _Callbacks, lora: TrainableLora, config: TrainConfig, step: int, total: int) -> None:
        if cb.on_publish is not None and config.publish_every and step % config.publish_every == 0 and step < total:
            cb.on_publish(lora.export(), step)


def _save_optimizer(optimizer: torch.optim.Optimizer, lora: TrainableLora) -> bytes:
    buffer = io.BytesIO()
    names = [name for name, _ in lora.named_parameters()]
    torch.save({"param_names": names, "state": optimizer.state_dict()}, buffer)
    return buffer.getvalue()


def _load_optimizer(optimizer: torch.optim.Optimizer, lora: TrainableLora, data: bytes, lr: float) -> None:
    """Resume AdamW moments if they belong to the same parameters; else start them fresh."""
    saved = torch.load(io.BytesIO(data), weights_only=True)
    names = [name for name, _ in lora.named_parameters()]
    if saved.get("param_names") != names:
        log.info("optimizer state does not match this adapter's parameters; starting it fresh")
        return
    optimizer.load_state_dict(saved["state"])
    for group in optimizer.param_groups:
        group["lr"] = lr
