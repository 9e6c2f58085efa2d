"""StatePool: slot ids for the per-sequence state of linear-attention layers (conv window +
recurrent state). One slot per running sequence of a hybrid model.

This class only hands out ids; the runner owns the tensors and zeroes a slot's state before
the step in which a new sequence first uses it (the scheduler lists those slots).
"""

from __future__ import annotations


class StatePool:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        """A free slot id, or None when all are taken."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"state slot {slot} freed twice"
        self._free.append(slot)
