"""Scheduler: which sequences run this step, and how many tokens each.

Every step has a token budget. Running sequences go first, in admission order: a decode
takes one token, a sequence still prefilling takes what is left of its prompt, up to the
budget (chunked prefill). Then waiting sequences are admitted in arrival order while the
budget, `max_num_seqs`, KV blocks and state slots allow. When a running sequence cannot
get blocks, the most recently admitted one is preempted: its blocks and state slot are
freed and it waits at the head of the queue to be recomputed (prefix caching makes that
cheap where it is on).

The scheduler never touches tensors; `schedule` returns a plain SchedulerOutput.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln_ray.engine.block_manager import BlockCopy, BlockManager
from kiln_ray.engine.request import Request, RequestStatus
from kiln_ray.engine.state_pool import StatePool


@dataclass(frozen=True)
class ScheduledSequence:
    request: Request
    num_new_tokens: int  # tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run now
    block_ids: tuple[int, ...]  # the sequence's block table for this step

    @property
    def samples(self) -> bool:
        """Whether this step completes the known tokens, so its last logits are sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)  # before the forward
    state_resets: list[int] = field(default_factory=list)  # slots to zero before the forward
    state_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) slots

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        state_pool: StatePool | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ):
        self.blocks = block_manager
        self.states = state_pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Work the engine queued between steps (forks); handed to the runner with the next output.
        self._pending_copies: list[BlockCopy] = []
        self._pending_state_copies: list[tuple[int, int]] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies, state_copies=self._pending_state_copies)
        self._pending_copies, self._pending_state_copies = [], []
        budget = self.max_num_batched_tokens
        planned: list[tuple[Request, int]] = []

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                planned.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break

        # 2. Waiting sequences, in order, unless this step already had to preempt.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if self.states is not None and self.states.num_free == 0:
                break
            prefix = self.blocks.find_cached_prefix(req) if req.num_computed_tokens == 0 else None
            cached = prefix.num_tokens(self.blocks.block_size) if prefix else 0
            num_new = min(req.num_tokens - req.num_computed_tokens - cached, budget)
            if not self.blocks.allocate(req, num_new, prefix):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if self.states is not None:
                req.state_slot = self.states.allocate()
                out.state_resets.append(req.state_slot)
            self.running.append(req)
            planned.append((req, num_new))
            budget -= num_new

        out.sequences = [
            ScheduledSequence(req, n, tuple(self.blocks.block_ids(req))) for req, n in planned
        ]
        return out

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.blocks.free(req)
        if req.state_slot is not None:
            self.states.free(req.state_slot)
            req.state_slot = None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a sequence (stopped, out of length, or aborted): free everything it holds."""
        assert status.finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = status

    def try_fork(self, parent: Request, child: Request) -> bool:
        """Start `child` running on a copy of the parent's computed state (n > 1 sampling).

        Needs a free slot in `max_num_seqs`, a block for the partial last block and, for
        hybrid models, a state slot; without them it returns False and the caller queues the
        child to be recomputed instead.
        """
        if len(self.running) >= self.max_num_seqs or not self.blocks.can_fork(parent):
            return False
        if self.states is not None and self.states.num_free == 0:
            return False
        copy = self.blocks.fork(parent, child)
        if copy is not None:
            self._pending_copies.append(copy)
        if self.states is not None:
            child.state_slot = self.states.allocate()
            self._pending_state_copies.append((parent.state_slot, child.state_slot))
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)
        return True
