"""ModelRunner: a SchedulerOutput -> one forward pass over a flat batch -> sampled tokens.

The runner owns the device tensors: the model, the paged KV cache and the state slots of
linear-attention layers. Per step it performs queued block/state copies, packs the
scheduled sequences (decodes first, then prefill chunks) into token ids, positions, slot
mapping and block tables, runs the model once, and samples the sequences whose known
tokens are now all computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import AttentionMetadata
from kiln_ray.engine.request import Request, TokenLogprob
from kiln_ray.engine.sampler import Sampler
from kiln_ray.engine.scheduler import ScheduledSequence, SchedulerOutput
from kiln_ray.model.causal_lm import CausalLM
from kiln_ray.model.context import ForwardContext, LayerCaches, StateMetadata
from kiln_ray.model.lora import AdapterSlots, LoraBatch


@dataclass(frozen=True)
class Sample:
    """One sampled token for one sequence (a group's first step samples for every sibling)."""

    request: Request
    token_id: int
    logprob: TokenLogprob | None


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_kv_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        num_state_slots: int,
        device: torch.device,
    ):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(model.kernels.argmax)
        self.adapter_slots: AdapterSlots | None = None  # set by the engine when LoRA is on
        kv_shape = (num_kv_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.caches = LayerCaches(
            kv=[
                (torch.zeros(kv_shape, dtype=kv_dtype, device=device), torch.zeros(kv_shape, dtype=kv_dtype, device=device))
                for _ in range(cfg.num_full_attention_layers)
            ],
            conv=[
                torch.zeros(
                    (num_state_slots, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1), dtype=model.dtype, device=device
                )
                for _ in range(cfg.num_linear_attention_layers)
            ],
            recurrent=[
                torch.zeros(
                    (num_state_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                    dtype=torch.float32,
                    device=device,
                )
                for _ in range(cfg.num_linear_attention_layers)
            ],
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[Sample]:
        self._apply_copies(out)
        # Decodes first (query length 1), then prefill chunks; sort is stable.
        seqs = sorted(out.sequences, key=lambda s: s.num_new_tokens != 1)
        input_ids, positions, slot_mapping = self._flatten(seqs)
        query_lens = [s.num_new_tokens for s in seqs]
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        ctx = ForwardContext(cu_seqlens=cu, caches=self.caches)
        num_decodes = sum(1 for n in query_lens if n == 1)
        if self.caches.kv:
            ctx.attention = AttentionMetadata.build(
                query_lens=query_lens,
                context_lens=[s.request.num_computed_tokens + s.num_new_tokens for s in seqs],
                block_tables=[list(s.block_ids) for s in seqs],
                slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=self.device),
                block_size=self.block_size,
                device=self.device,
            )
        if self.caches.recurrent:
            slots = torch.tensor([s.request.state_slot for s in seqs], dtype=torch.int64, device=self.device)
            ctx.states = StateMetadata(slots=slots, num_decodes=num_decodes)
        ctx.lora = self._lora_batch(seqs, cu)

        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
            ctx,
        )

        rows: list[Request] = []
        row_index: list[int] = []
        for i, s in enumerate(seqs):
            if s.samples:
                group = [s.request, *s.request.pending_siblings]
                rows.extend(group)
                row_index.extend([cu[i + 1] - 1] * len(group))
        if not rows:
            return []
        upcast = not self.sampler.is_plain_greedy(rows)  # plain greedy: argmax of the model-dtype logits
        logits = self.model.compute_logits(hidden[torch.tensor(row_index, device=self.device)], upcast)
        tokens, logprobs = self.sampler(logits, rows)
        return [Sample(r, t, lp) for r, t, lp in zip(rows, tokens, logprobs)]

    def _lora_batch(self, seqs: list[ScheduledSequence], cu: list[int]) -> LoraBatch | None:
        """Rows of the flat batch grouped by adapter slot (None when no row uses one)."""
        rows_by_slot: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.request.adapter is not None:
                rows_by_slot.setdefault(s.request.adapter.slot, []).extend(range(cu[i], cu[i + 1]))
        if not rows_by_slot:
            return None
        if len(rows_by_slot) == 1 and len(next(iter(rows_by_slot.values()))) == cu[-1]:
            return LoraBatch(self.adapter_slots, [(next(iter(rows_by_slot)), None)])  # every row
        groups = [(slot, torch.tensor(rows, dtype=torch.int64, device=self.device)) for slot, rows in rows_by_slot.items()]
        return LoraBatch(self.adapter_slots, groups)

    def _flatten(self, seqs: list[ScheduledSequence]) -> tuple[list[int], list[int], list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        for s in seqs:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(s.request.token_ids[start:end])
            positions.extend(range(start, end))
            table = s.block_ids
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        return input_ids, positions, slot_mapping

    def _apply_copies(self, out: SchedulerOutput) -> None:
        for copy in out.block_copies:
            for k_cache, v_cache in self.caches.kv:
                k_cache[copy.dst] = k_cache[copy.src]
                v_cache[copy.dst] = v_cache[copy.src]
        for src, dst in out.state_copies:
            for pool in (*self.caches.conv, *self.caches.recurrent):
                pool[dst] = pool[src]
        for slot in out.state_resets:
            for pool in (*self.caches.conv, *self.caches.recurrent):
                pool[slot].zero_()
