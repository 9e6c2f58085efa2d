"""Multi-adapter LoRA: the slot-grouped path (`lora_delta`) equals the per-row reference
(`lora_delta_reference`) on flat batches that mix slots and rows with no adapter."""

from dataclasses import dataclass

import pytest
import torch

from kernels.lora import lora_delta, lora_delta_reference
from tests.helpers import rel_rms

FP32_TOL = 1e-6
BF16_TOL = 1e-2


@dataclass(frozen=True)
class Shape:
    rows: int  # T: tokens in the flat batch
    rank: int  # R: the stacked rank of one projection's sites
    slots: int  # S: resident adapter slots
    pattern: str  # which slot each row uses (see row_slots)

    @property
    def id(self) -> str:
        return f"T{self.rows}-R{self.rank}-S{self.slots}-{self.pattern}"


def row_slots(shape: Shape, gen: torch.Generator) -> list[int | None]:
    """one-slot: every row on slot 0 (the runner's "every row" group); mixed: each row on a
    random slot or on none; base-only: no row uses an adapter; runs: contiguous runs per
    slot, as sequences lie in a batch, with a slot left unused."""
    t, s = shape.rows, shape.slots
    if shape.pattern == "one-slot":
        return [0] * t
    if shape.pattern == "base-only":
        return [None] * t
    if shape.pattern == "runs":
        bounds = sorted(torch.randint(1, t, (s,), generator=gen).tolist())
        slots = [None] + list(range(s - 1))  # slot s-1 resident but unused; some rows on the base
        return [slots[sum(i >= b for b in bounds) % len(slots)] for i in range(t)]
    choice = torch.randint(0, s + 1, (t,), generator=gen).tolist()
    return [None if c == s else c for c in choice]


def groups_of(slots_per_row: list[int | None]) -> list[tuple[int, torch.Tensor | None]]:
    """The runner's grouping: rows by slot; one group of None when every row uses one slot."""
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots_per_row):
        if slot is not None:
            by_slot.setdefault(slot, []).append(row)
    if len(by_slot) == 1 and len(next(iter(by_slot.values()))) == len(slots_per_row):
        return [(next(iter(by_slot)), None)]
    return [(slot, torch.tensor(rows, dtype=torch.int64)) for slot, rows in by_slot.items()]


SHAPES = [
    Shape(1, 8, 1, "one-slot"),  # a single decode token
    Shape(33, 8, 3, "mixed"),
    Shape(33, 8, 3, "runs"),
    Shape(64, 16, 4, "mixed"),
    Shape(17, 4, 2, "one-slot"),
    Shape(9, 8, 2, "base-only"),
    Shape(100, 48, 3, "mixed"),  # R = 3 sites x rank 16 side by side (a fused qkv projection)
]
SHAPE_PARAMS = [pytest.param(shape, id=shape.id) for shape in SHAPES]
DTYPES = [pytest.param(torch.float32, FP32_TOL, id="fp32"), pytest.param(torch.bfloat16, BF16_TOL, id="bf16")]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_grouped_path_matches_the_per_row_reference(shape, dtype, tol):
    gen = torch.Generator().manual_seed(shape.rows * 131 + shape.rank)
    d_in, d_out = 48, 40
    x = torch.randn(shape.rows, d_in, generator=gen).to(dtype)  # (T, in)
    out = torch.randn(shape.rows, d_out, generator=gen).to(dtype)  # (T, out): the base projection
    a = (torch.randn(shape.slots, shape.rank, d_in, generator=gen) * d_in**-0.5).to(dtype)  # (S, R, in)
    b = torch.randn(shape.slots, d_out, shape.rank, generator=gen).to(dtype)  # (S, out, R)
    slots = row_slots(shape, gen)

    expected = lora_delta_reference(x, out, a, b, slots)
    got = lora_delta(x, out.clone(), a, b, groups_of(slots))

    assert rel_rms(got, expected) < tol
    no_adapter = torch.tensor([s is None for s in slots])
    assert torch.equal(got[no_adapter], out[no_adapter])  # base rows are left exactly as they were
    if shape.pattern != "base-only":
        assert rel_rms(expected, out) > 10 * tol  # the deltas are large enough to notice a miss
