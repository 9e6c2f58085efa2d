"""AdapterManager: which adapter version sits in which slot, who is using it, and the hot swap.

Bookkeeping only (the runner owns the slot tensors). Resident entries are keyed by
(name, version); `current[name]` is the version a request that names no version gets.

    publish(name, v)     a free slot is chosen (the caller loads the tensors into it), then
                         current[name] flips to v in one assignment. Requests admitted
                         before the flip keep the slot they pinned (version v-1) until they
                         finish; that slot is freed when its last pin goes.
    pin / unpin          one pin per running sequence; a pinned slot is never reused
    free slot            never-used, or resident but neither current nor pinned; if none,
                         the least recently used current adapter with no pins is evicted (the
                         server reloads it from the store when asked for again)

Invariant: a slot is either free or holds exactly one entry; an entry with pins > 0 is
resident until its pins reach 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


class AdapterNotLoaded(KeyError):
    """The adapter (version) is not resident in the engine."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "adapter not loaded"


class AdapterSlotsFull(RuntimeError):
    """Every slot is pinned by running requests; retry once some finish."""


@dataclass
class Resident:
    name: str
    version: int
    slot: int
    uid: int  # unique per install in this process: an adapter deleted and re-created as
    # name@1 must never share prefix-cache KV with the old name@1
    pins: int = 0
    last_used: int = 0

    @property
    def cache_key(self) -> str:
        return f"{self.name}@{self.version}#{self.uid}"


class AdapterManager:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.residents: dict[tuple[str, int], Resident] = {}
        self.by_slot: dict[int, Resident] = {}
        self.current: dict[str, int] = {}
        self._clock = itertools.count(1)
        self._uids = itertools.count(1)
        self._published: set[str] = set()
        self.num_swaps = 0  # make_current installs of a name that had been current before

    # -- queries -------------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None) -> Resident:
        """The resident entry a request for `name` (at `version`, default current) would use."""
        if version is None:
            if name not in self.current:
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            version = self.current[name]
        entry = self.residents.get((name, version))
        if entry is None:
            raise AdapterNotLoaded(f"adapter {name}@{version} is not loaded")
        return entry

    def is_resident(self, name: str, version: int) -> bool:
        return (name, version) in self.residents

    def listing(self) -> list[dict]:
        """A snapshot; safe to call from another thread (the copies below are single C-level
        operations under the GIL, and nothing else iterates a live dict)."""
        residents, current = list(self.residents.values()), dict(self.current)
        return [
            {"name": r.name, "version": r.version, "slot": r.slot, "pins": r.pins,
             "current": current.get(r.name) == r.version}
            for r in sorted(residents, key=lambda r: (r.name, r.version))
        ]

    # -- changes -------------------------------------------------------------------------------

    def reserve_slot(self) -> int:
        """A slot a new adapter may be written into now (nothing running reads it)."""
        used = set(self.by_slot)
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        idle = [r for r in self.residents.values() if r.pins == 0]
        stale = [r for r in idle if self.current.get(r.name) != r.version]
        victims = stale or idle
        if not victims:
            raise AdapterSlotsFull(f"all {self.num_slots} adapter slots are in use by running requests")
        victim = min(victims, key=lambda r: r.last_used)
        self._drop(victim)
        return victim.slot

    def install(self, name: str, version: int, slot: int, make_current: bool) -> Resident:
        """Record that (name, version) now sits in `slot` (reserved and loaded by the caller);
        with make_current, new requests for `name` get it from now on (the hot swap)."""
        old = self.residents.get((name, version))
        if old is not None:
            self._drop(old)
        entry = Resident(name, version, slot, uid=next(self._uids), last_used=next(self._clock))
        self.residents[(name, version)] = entry
        self.by_slot[slot] = entry
        if make_current:
            self.make_current(name, version)
        return entry

    def make_current(self, name: str, version: int) -> None:
        """Flip `name` to a resident version (the hot swap's single assignment)."""
        assert (name, version) in self.residents
        previous = self.current.get(name)
        self.current[name] = version
        self.num_swaps += name in self._published
        self._published.add(name)
        if previous is not None and previous != version:
            self._release_if_idle(self.residents.get((name, previous)))

    def pin(self, entry: Resident) -> None:
        entry.pins += 1
        entry.last_used = next(self._clock)

    def unpin(self, entry: Resident) -> None:
        assert entry.pins > 0, f"{entry.cache_key} unpinned more often than pinned"
        entry.pins -= 1
        self._release_if_idle(entry)

    def unload(self, name: str) -> list[int]:
        """Forget every version of `name`: idle slots are freed now, pinned ones when their
        requests finish. Returns the versions that were resident."""
        self.current.pop(name, None)
        versions = [v for (n, v) in list(self.residents) if n == name]
        for v in versions:
            self._release_if_idle(self.residents[(name, v)])
        return versions

    def _release_if_idle(self, entry: Resident | None) -> None:
        """Free a slot that nothing needs any more: no pins and not current."""
        if entry is not None and entry.pins == 0 and self.current.get(entry.name) != entry.version:
            self._drop(entry)

    def _drop(self, entry: Resident) -> None:
        assert entry.pins == 0
        self.residents.pop((entry.name, entry.version), None)
        if self.by_slot.get(entry.slot) is entry:
            del self.by_slot[entry.slot]
        if self.current.get(entry.name) == entry.version:
            del self.current[entry.name]
