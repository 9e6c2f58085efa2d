"""AdapterManager: which adapter version sits in which slot, who is using it, and the hot swap.

Bookkeeping only (the runner owns the slot tensors). Resident entries are keyed by
(name, version); `current[name]` is the version a request that names no version gets.

    reserve(name, v)     a free slot is set aside for v (a SlotFill); the caller copies the
                         tensors into it, on any thread, while steps go on: no request can
                         resolve to a slot being filled and no other reservation gets it
    commit(fill)         the flip: v becomes resident and, if asked, current[name] flips to
                         v in one assignment. Requests admitted before the flip keep the slot
                         they pinned (version v-1) until they finish; that slot is freed when
                         its last pin goes. abandon(fill) gives a slot back unused.
    pin / unpin          one pin per running sequence; a pinned slot is never reused
    free slot            never-used, or resident but neither current nor pinned; if none,
                         the least recently used current adapter with no pins is evicted (the
                         server reloads it from the store when asked for again)

Invariant: a slot is free, being filled (one SlotFill) or holds exactly one entry; an entry
with pins > 0 is resident until its pins reach 0.
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


@dataclass
class SlotFill:
    """A slot reserved for (name, version) while its tensors are copied in. Valid until
    `commit` or `abandon`; meanwhile no request can use the slot and no other reservation is
    handed it, so the copy may run beside steps."""

    name: str
    version: int
    slot: int
    make_current: bool
    cancelled: bool = False  # `unload(name)` came during the copy: commit frees the slot instead


class AdapterManager:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.residents: dict[tuple[str, int], Resident] = {}
        self.by_slot: dict[int, Resident] = {}
        self.filling: dict[int, SlotFill] = {}  # slot -> its reservation, until commit or abandon
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

    def reserve(self, name: str, version: int, make_current: bool) -> SlotFill:
        """Set a slot aside for (name, version): a never-used one, else the least recently
        used idle entry's (stale versions first), which is evicted now. Nothing running reads
        the slot, and nothing will until `commit`. Raises AdapterSlotsFull when every slot is
        pinned or being filled."""
        used = set(self.by_slot) | set(self.filling)
        slot = next((s for s in range(self.num_slots) if s not in used), None)
        if slot is None:
            idle = [r for r in self.residents.values() if r.pins == 0]
            stale = [r for r in idle if self.current.get(r.name) != r.version]
            victims = stale or idle
            if not victims:
                raise AdapterSlotsFull(f"all {self.num_slots} adapter slots are in use by running requests or loads")
            victim = min(victims, key=lambda r: r.last_used)
            self._drop(victim)
            slot = victim.slot
        fill = SlotFill(name, version, slot, make_current)
        self.filling[slot] = fill
        return fill

    def commit(self, fill: SlotFill) -> Resident | None:
        """The filled slot now serves (name, version); with make_current, new requests for
        `name` get it from now on (the hot swap). None, and the slot is free again, if the name
        was unloaded during the copy. If the version became resident meanwhile (two loads
        raced), that entry stays, this copy is dropped, and the existing entry is returned."""
        assert self.filling.get(fill.slot) is fill, "commit of a slot fill that is not pending"
        del self.filling[fill.slot]
        if fill.cancelled:
            return None
        entry = self.residents.get((fill.name, fill.version))
        if entry is None:
            entry = Resident(fill.name, fill.version, fill.slot, uid=next(self._uids), last_used=next(self._clock))
            self.residents[(fill.name, fill.version)] = entry
            self.by_slot[fill.slot] = entry
        if fill.make_current:
            self.make_current(fill.name, fill.version)
        return entry

    def abandon(self, fill: SlotFill) -> None:
        """Give a reserved slot back unused (its copy failed)."""
        if self.filling.get(fill.slot) is fill:
            del self.filling[fill.slot]

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
        requests finish, and copies in flight are freed at their commit. Returns the versions
        that were resident."""
        self.current.pop(name, None)
        for fill in self.filling.values():  # a copy still in flight must not bring it back
            if fill.name == name:
                fill.cancelled = True
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
