"""LLMEngine: add_request / step / abort over token ids. Plain Python + torch, one thread.

    engine = LLMEngine.from_config(KilnConfig(model="/path/to/model"))
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():        # RequestOutput increments: new tokens, finish reason
            ...

Sampling n > 1 prefills the prompt once: sequence 0 runs, and at its first sample every
sibling samples from the same logits with its own generator and forks its KV blocks (the
full ones shared, the partial last one copied) and, for hybrid models, its state slot.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.dispatch import select_kernels
from kernels.linear import prepack_wanted
from kiln_ray.config import EngineConfig, KilnConfig, torch_dtype
from kiln_ray.engine.adapter_manager import AdapterManager, SlotFill
from kiln_ray.engine.block_manager import BlockManager
from kiln_ray.engine.guide import Guide, GuideRuntime, GuideState, TokenVocabulary
from kiln_ray.engine.request import Request, RequestOutput, RequestStatus
from kiln_ray.engine.runner import ModelRunner, Sample
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.engine.scheduler import Scheduler
from kiln_ray.engine.state_pool import StatePool
from kiln_ray.model.causal_lm import MAX_POSITIONS, CausalLM
from kiln_ray.model.lora import AdapterSlots, LoraWeights

log = logging.getLogger(__name__)

GUIDE_CACHE_SIZE = 8  # grammars whose masks are kept (the same tools or schema, request after request)


class EngineFullError(RuntimeError):
    """max_num_seqs sequences run and max_waiting_requests wait already; retry later."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    state_slots_used: int
    state_slots_total: int
    prefix_cache_hit_tokens: int
    prefix_cache_queried_tokens: int
    num_preemptions: int
    steps: int
    last_batch_tokens: int
    last_batch_seqs: int
    peak_batch_seqs: int  # the most sequences one step has run since start


class LLMEngine:
    def __init__(
        self, model: CausalLM, config: EngineConfig, device: torch.device | str = "cpu",
        tokenizer_path: str | Path | None = None,
    ):
        """`tokenizer_path`: where guided requests (SamplingParams.guide) read the token bytes
        from (the model's directory or GGUF file); without it, such requests are refused."""
        self.model = model
        self.config = config
        self.device = torch.device(device)
        cfg = model.config
        # Not on an AMX CPU: there the plain weights are already the fast path (kernels/linear.py),
        # so they stay the one copy shared with the trainer.
        if config.prepack_weights and prepack_wanted(self.device, model.dtype):
            model.prepack()
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, MAX_POSITIONS)
        kv_dtype = torch_dtype(config.kv_cache_dtype, model.dtype)
        num_blocks = self._num_kv_blocks(kv_dtype)
        capacity = num_blocks * config.block_size
        if capacity < self.max_model_len:
            log.warning("KV cache holds %d tokens; lowering max_model_len from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        prefix_caching = config.enable_prefix_caching
        if prefix_caching is None:
            prefix_caching = not cfg.is_hybrid
        if prefix_caching and cfg.is_hybrid:
            raise ValueError("prefix caching is not supported for hybrid (linear-attention) models")
        self.prefix_caching = prefix_caching
        num_state_slots = config.max_num_seqs if cfg.is_hybrid else 0
        self.block_manager = BlockManager(num_blocks, config.block_size, prefix_caching)
        self.state_pool = StatePool(num_state_slots) if cfg.is_hybrid else None
        self.scheduler = Scheduler(
            self.block_manager, self.state_pool, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, kv_dtype, num_state_slots, self.device)
        self.adapters = AdapterManager(config.max_loras)
        if config.max_loras:
            self.runner.adapter_slots = AdapterSlots(
                model, config.max_loras, config.max_lora_rank, tuple(config.lora_targets), model.dtype
            )
        self.eos_token_ids = frozenset(cfg.eos_token_ids)
        self.requests: dict[str, list[Request]] = {}  # request_id -> its sequences (siblings included)
        self.tokenizer_path = tokenizer_path
        self.vocabulary: TokenVocabulary | None = None  # read on the first guided request
        self._vocabulary_reader: Future | None = None  # or ahead of it (preload_vocabulary)
        self._guides: OrderedDict[str, GuideRuntime] = OrderedDict()
        self.num_steps = 0
        self._last_batch = (0, 0)
        self._peak_batch_seqs = 0
        log.info(
            "engine: %d KV blocks x %d tokens (%s), max_model_len %d, max_num_seqs %d, prefix caching %s",
            num_blocks,
            config.block_size,
            str(kv_dtype).removeprefix("torch."),
            self.max_model_len,
            config.max_num_seqs,
            "on" if prefix_caching else "off",
        )

    @classmethod
    def from_config(cls, config: KilnConfig, model_path: str | None = None) -> LLMEngine:
        """Load the configured model (`model_path` overrides config.model) and build the engine."""
        from kiln_ray.model.loader import load_model
        from kiln_ray.model.registry import resolve_model_path

        device = config.torch_device()
        # Ray sets OMP_NUM_THREADS to an actor's (fractional, rounded) CPU share; the engine
        # uses every core unless told otherwise.
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        # Strongly decaying linear-attention heads underflow into denormals, which are slow on CPU.
        torch.set_flush_denormal(True)
        path = model_path or resolve_model_path(config.model, config.home)
        kernels = select_kernels(device, config.engine.kernels, config.torch_dtype(), config.engine.block_size)
        model = load_model(path, config.torch_dtype(), device, kernels)
        engine = cls(model, config.engine, device, tokenizer_path=path)
        engine.preload_vocabulary()
        return engine

    def _num_kv_blocks(self, kv_dtype: torch.dtype) -> int:
        """Blocks that fit the budget after the linear-attention state slots (hybrid models:
        one float32 recurrent state + conv window per running sequence) are taken from it."""
        cfg, ec = self.model.config, self.config
        if ec.num_kv_blocks is not None:
            return ec.num_kv_blocks
        per_block = max(cfg.kv_bytes_per_token(torch.finfo(kv_dtype).bits // 8), 1) * ec.block_size
        budget = ec.kv_cache_bytes
        if budget is None:
            budget = int(_free_memory(self.device) * ec.kv_cache_memory_fraction)
        if cfg.is_hybrid:
            per_slot = cfg.num_linear_attention_layers * (
                cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
                + cfg.linear_conv_dim * (cfg.linear_conv_kernel_dim - 1) * self.model.dtype.itemsize
            )
            budget -= per_slot * ec.max_num_seqs
            if budget < per_block:
                raise ValueError(
                    f"the memory budget cannot hold {ec.max_num_seqs} state slots of {per_slot >> 20} MiB plus any "
                    "KV cache: lower max_num_seqs or raise kv_cache_bytes / kv_cache_memory_fraction"
                )
        # Never more than enough for every sequence at full length.
        most = ec.max_num_seqs * -(-self.max_model_len // ec.block_size)
        return max(1, min(budget // per_block, most))

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        adapter_version: int | None = None,
    ) -> None:
        """Queue a request, on the base model or on adapter `adapter` (its current version,
        or `adapter_version`), which stays pinned until the request ends. Raises ValueError
        for input the engine cannot serve, AdapterNotLoaded for an adapter that is not
        resident, and EngineFullError when the queue is full."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context limit of {self.max_model_len} tokens"
            )
        # Room for max_num_seqs running plus max_waiting_requests queued behind them, counting
        # every sequence of a group (siblings waiting for their prefill too).
        capacity = self.config.max_num_seqs + self.config.max_waiting_requests
        if params.n > capacity:
            raise ValueError(f"n={params.n} exceeds this server's capacity of {capacity} sequences")
        active = sum(1 for group in self.requests.values() for r in group if not r.status.finished)
        if active + params.n > capacity:
            raise EngineFullError(f"{active} sequences are running or waiting (limit {capacity})")
        runtime = None if params.guide is None else self._guide_runtime(params.guide)
        entry = None if adapter is None else self.adapters.resolve(adapter, adapter_version)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        cache_key = None if entry is None else entry.cache_key  # KV of one adapter version only
        group = [
            Request(request_id, prompt_token_ids, params, index=i, cache_key=cache_key, stop_token_ids=stop_ids)
            for i in range(params.n)
        ]
        if runtime is not None:
            for req in group:
                req.guide = GuideState(params.guide, runtime, stop_ids)
        if entry is not None:
            for req in group:
                req.adapter = entry
                self.adapters.pin(entry)
        group[0].pending_siblings = group[1:]
        self.requests[request_id] = group
        self.scheduler.add(group[0])

    def _guide_runtime(self, guide: Guide) -> GuideRuntime:
        """The shared runtime (and mask cache) of this guide's grammar; the vocabulary is read
        from the tokenizer once, on the first guided request."""
        runtime = self._guides.get(guide.grammar.key)
        if runtime is not None:
            self._guides.move_to_end(guide.grammar.key)
            return runtime
        if self.vocabulary is None:
            if self.tokenizer_path is None:
                raise ValueError("guided decoding needs the model's tokenizer, and this engine has none")
            reader = self._vocabulary_reader
            self.vocabulary = reader.result() if reader is not None else self._read_vocabulary()
        runtime = self._guides[guide.grammar.key] = GuideRuntime(guide.grammar, self.vocabulary)
        if len(self._guides) > GUIDE_CACHE_SIZE:
            self._guides.popitem(last=False)
        return runtime

    def preload_vocabulary(self) -> None:
        """Read the token bytes on a thread of their own now, so the first guided request does
        not stall every stream of the step thread for the 0.5-1.5 s it takes."""
        if self.tokenizer_path is not None and self.vocabulary is None and self._vocabulary_reader is None:
            # The thread ends when the read does, and with it any torch thread pool it made.
            pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-vocabulary")
            self._vocabulary_reader = pool.submit(self._read_vocabulary)
            self._vocabulary_reader.add_done_callback(self._vocabulary_read)
            pool.shutdown(wait=False)

    def _vocabulary_read(self, reader: Future) -> None:
        error = reader.exception()
        if error is not None:  # said now, not at the first guided request; that one reads again
            log.warning("guided decoding: the token bytes could not be read (%r); the next guided request tries again", error)
            self._vocabulary_reader = None

    def _read_vocabulary(self) -> TokenVocabulary:
        from kiln_ray.model.registry import load_tokenizer

        vocabulary = TokenVocabulary.from_tokenizer(load_tokenizer(self.tokenizer_path), self.model.config.vocab_size)
        log.info("guided decoding: read the bytes of %d tokens", vocabulary.size)
        return vocabulary

    def abort(self, request_id: str) -> bool:
        """Stop every sequence of the request and free what they hold. False if unknown."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return False
        for req in group:
            if not req.status.finished:
                self._retire(req, RequestStatus.FINISHED_ABORTED)
        return True

    def _retire(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        if req.adapter is not None:
            self.adapters.unpin(req.adapter)
            req.adapter = None

    # -- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name: str, version: int, weights: LoraWeights, make_current: bool = True) -> int | None:
        """The hot swap in one go on the calling thread, between steps: reserve, fill and
        commit below. Returns the slot. Raises AdapterSlotsFull or ValueError (rank/targets)."""
        fill = self.reserve_adapter_slot(name, version, weights, make_current)
        if fill is None:
            return self.adapters.resolve(name, version).slot
        try:
            self.fill_adapter_slot(fill, weights)
        except BaseException:
            self.adapters.abandon(fill)
            raise
        return self.commit_adapter_slot(fill)

    def reserve_adapter_slot(self, name: str, version: int, weights: LoraWeights, make_current: bool = True) -> SlotFill | None:
        """Hot swap, phase 1 (loop thread, between steps): check that the adapter fits, then
        set a free slot aside for it. None if (name, version) is resident already (two first
        requests raced to load it): it is made current if asked and nothing needs copying.
        Raises AdapterSlotsFull or ValueError (rank/targets/shapes) before any slot changes."""
        if not self.config.max_loras:
            raise ValueError("LoRA serving is disabled (max_loras: 0)")
        if self.adapters.is_resident(name, version):
            if make_current:
                self.adapters.make_current(name, version)
            return None
        self.runner.adapter_slots.check(weights)  # before a slot is freed for it
        return self.adapters.reserve(name, version, make_current)

    def fill_adapter_slot(self, fill: SlotFill, weights: LoraWeights) -> None:
        """Hot swap, phase 2 (any thread, also while a step runs): copy the tensors into the
        reserved slot. Safe beside a step because a step reads only the slots of its rows
        (kernels/lora.py indexes a[slot], b[slot] per group), a row's slot comes from a resident
        entry, and a slot being filled has none. Writes nothing but that slot's buffers."""
        self.runner.adapter_slots.load(fill.slot, weights)

    def commit_adapter_slot(self, fill: SlotFill) -> int | None:
        """Hot swap, phase 3 (loop thread, between steps): the flip, bookkeeping only.
        Requests admitted from now on get the new version; running ones keep the version they
        pinned. Returns the slot now serving (name, version), or None if the name was unloaded
        during the copy (the slot is free again)."""
        entry = self.adapters.commit(fill)
        if entry is None:
            log.info("adapter %s@%d was unloaded during its copy; slot %d freed", fill.name, fill.version, fill.slot)
            return None
        log.info("adapter %s@%d in slot %d%s", fill.name, fill.version, entry.slot,
                 " (current)" if fill.make_current else "")
        return entry.slot

    def abandon_adapter_slot(self, fill: SlotFill) -> None:
        """Give a reserved slot back unused (loop thread), e.g. when its copy failed."""
        self.adapters.abandon(fill)

    def unload_adapter(self, name: str) -> list[int]:
        """Stop serving `name` to new requests; its slots free up as running requests end."""
        return self.adapters.unload(name)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample; returns what changed for each sequence."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        samples = self.runner.execute(sched)
        self.num_steps += 1
        self._last_batch = (sched.num_batched_tokens, len(sched.sequences))
        self._peak_batch_seqs = max(self._peak_batch_seqs, len(sched.sequences))
        for s in sched.sequences:
            s.request.num_computed_tokens += s.num_new_tokens
        return self._process_samples(samples, [s.request for s in sched.sequences])

    def _process_samples(self, samples: list[Sample], computed: list[Request]) -> list[RequestOutput]:
        for req in computed:
            self.block_manager.cache_full_blocks(req)
        for sample in samples:
            sample.request.token_ids.append(sample.token_id)
            if sample.request.guide is not None:
                sample.request.guide.advance(sample.token_id)
        # Fork before any stop check can free the blocks the siblings share.
        for sample in samples:
            if sample.request.pending_siblings:
                self._fork_siblings(sample.request)
        return [self._output_for(s.request, [s]) for s in samples]

    def _fork_siblings(self, parent: Request) -> None:
        siblings, parent.pending_siblings = parent.pending_siblings, []
        for child in siblings:
            if not self.scheduler.try_fork(parent, child):
                self.scheduler.waiting.appendleft(child)  # recompute it (prefix-cached where possible)

    def _output_for(self, req: Request, samples: list[Sample]) -> RequestOutput:
        finish = self._check_stop(req)
        if finish is not None and not req.status.finished:
            self._retire(req, finish)
            self._forget_if_done(req.request_id)
        logprobs = [s.logprob for s in samples] if req.params.logprobs is not None else None
        return RequestOutput(
            request_id=req.request_id,
            index=req.index,
            new_token_ids=[s.token_id for s in samples],
            finish_reason=finish.value if finish is not None else None,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=req.num_output_tokens,
        )

    def _check_stop(self, req: Request) -> RequestStatus | None:
        last = req.token_ids[-1]
        # A complete guided document may stop before min_tokens: nothing else may follow it.
        done_early = req.guide is not None and req.guide.complete
        if last in req.stop_token_ids and (req.num_output_tokens >= req.params.min_tokens or done_early):
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _forget_if_done(self, request_id: str) -> None:
        group = self.requests.get(request_id)
        if group is not None and all(r.status.finished for r in group):
            del self.requests[request_id]

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm, sp = self.block_manager, self.state_pool
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            state_slots_used=sp.num_used if sp else 0,
            state_slots_total=sp.num_slots if sp else 0,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            prefix_cache_queried_tokens=bm.prefix_queried_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            steps=self.num_steps,
            last_batch_tokens=self._last_batch[0],
            last_batch_seqs=self._last_batch[1],
            peak_batch_seqs=self._peak_batch_seqs,
        )


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
