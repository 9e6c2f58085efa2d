"""Regular expressions as byte-level DFAs, for guided decoding: which bytes may come next.

`compile_regex(pattern)` turns a pattern (the subset kiln_ray/engine/regex_syntax.py parses) into a
`Regex`, a table of DFA states over bytes. It accepts exactly the UTF-8 encodings of the strings
`s` that `re.fullmatch(pattern, s)` matches once every class is narrowed to the code points it
holds under re.ASCII, under re's Unicode reading and under ECMA-262 alike (and `\\W` a little
further; regex_syntax explains): so every accepted string matches the pattern with or without
re.ASCII, and a JSON Schema `pattern` under an ECMA-262 validator too. guided_regex gets the same
treatment, since its client may check a reply with or without re.ASCII. A prefix is kept alive
only if some continuation is accepted, so a guide that follows `step` never writes itself into a
corner. Only valid UTF-8 is accepted or kept alive: no surrogates, nothing past U+10FFFF, no
overlong forms.

json_string=True reads the raw content bytes of a JSON string (between the quotes), written
unescaped: `"`, `\\` and U+0000-U+001F, which a JSON string can only hold escaped, are taken out of
every literal and class, so a pattern that needs them cannot match those strings; and `.` leaves
out U+2028 and U+2029 as well, which ECMA-262's `.` does not match. A pattern that matches no
string at all (with or without json_string) is a RegexError.

Bounds, since a pattern comes from a client and the engine's step thread compiles it:
MAX_PATTERN characters, MAX_NFA_STATES once counted repetition is expanded, MAX_DFA_STATES, and
MAX_WORK steps in all (class sets worked out, NFA states and edges made, NFA moves visited by the
subset construction, whose sets can be large while the DFA stays small, as in `(?:a?){1000}`,
and a row of the table per DFA state). Past any of them compile_regex raises RegexError rather
than work on: 0.1 s of compiling at most. `.{0,250}` (2001 states; `.{0,200}` as a JSON string,
whose `.` steps around U+2028 and U+2029) is about the longest bounded length that fits. A
RegexBudget bounds the patterns of one request together (a JSON schema may hold thousands). The
last CACHE_ENTRIES results (CACHE_CELLS table cells at most) are kept and handed out again: a
Regex is immutable, and a hit draws no budget.

    pattern --parse--> tree of code point sets --_Nfa--> Thompson NFA over byte ranges
            --_Subsets--> DFA over byte classes --drop states that cannot accept--> Regex

`integer_range` writes the pattern of the JSON integers between two bounds. No torch here.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

from kiln_ray.engine.regex_syntax import (
    Alternation, Chars, Concat, Node, Ranges, RegexError, Repeat, complement, parse, union,
)

__all__ = ["Regex", "RegexBudget", "RegexError", "compile_regex", "integer_range"]

MAX_PATTERN = 4096  # characters
MAX_NFA_STATES = 10_000
MAX_DFA_STATES = 2048
MAX_WORK = 300_000  # steps of one compile (a step: 0.1 to 0.3 us of work)
MAX_INTEGER_DIGITS = 40  # of an integer_range bound: 128-bit integers fit
CACHE_ENTRIES = 256
CACHE_CELLS = 1 << 22  # table entries of the cached Regexes together: 32 MiB of tuple slots

_SURROGATES: Ranges = ((0xD800, 0xDFFF),)  # never in valid UTF-8
_JSON_ESCAPED: Ranges = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))


@dataclass(frozen=True)
class Regex:
    """A compiled pattern: a DFA over bytes whose states are ints from 0. Every state is alive (an
    accepted string goes through it); `step` returns -1 for a byte that would leave them all, and
    -1 stays -1. Immutable, picklable plain data: shared by requests and sent to Ray actors."""

    pattern: str
    json_string: bool
    start: int
    classes: bytes  # byte -> its class: bytes of one class always step alike
    width: int  # number of classes
    table: tuple[int, ...]  # state * width + class -> next state, or -1
    accepts: tuple[bool, ...]
    ends: tuple[bool, ...]  # accepting, and no byte can follow

    def step(self, state: int, byte: int) -> int:
        if state < 0:
            return -1
        return self.table[state * self.width + self.classes[byte]]

    def feed(self, state: int, data: bytes) -> int:
        for byte in data:
            state = self.step(state, byte)
        return state

    def accepting(self, state: int) -> bool:
        return state >= 0 and self.accepts[state]

    def alive(self, state: int) -> bool:
        """Some continuation reaches acceptance: true of every state `step` returns but -1."""
        return state >= 0

    def finished(self, state: int) -> bool:
        """Accepting, and no byte can follow."""
        return state >= 0 and self.ends[state]


class RegexBudget:
    """Work and DFA states shared by the compiles of one request: every compile_regex given this
    budget draws on it as it works (a failing compile too), and the draw that overdraws it raises
    RegexError, as does every later one. A cached result draws nothing. For one thread."""

    def __init__(self, work: int = 2_000_000, states: int = 16_384):
        self.limits = (work, states)
        self.work = work  # left
        self.states = states  # left

    def draw(self, work: int = 0, states: int = 0) -> None:
        self.work -= work
        self.states -= states
        if self.work < 0 or self.states < 0:
            raise RegexError("the patterns of this request together are too large to compile (over "
                             f"{self.limits[0]} steps or {self.limits[1]} automaton states)")


def compile_regex(pattern: str, *, json_string: bool = False, budget: RegexBudget | None = None) -> Regex:
    """The DFA of `pattern` (see the module docstring), from the cache if it was compiled lately;
    draws on `budget` if it is not; raises RegexError."""
    if not isinstance(pattern, str):
        raise RegexError(f"a pattern must be a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"the pattern is longer than {MAX_PATTERN} characters")
    regex = _RECENT.get((pattern, json_string))
    if regex is None:
        regex = _compile(pattern, json_string, _Meter(budget))
        _RECENT.put((pattern, json_string), regex)
    return regex


def _compile(pattern: str, json_string: bool, meter: _Meter) -> Regex:
    nfa = _Nfa(union(_SURROGATES, _JSON_ESCAPED) if json_string else _SURROGATES, meter)
    entry, accept = nfa.build(parse(pattern, ecma=json_string, spend=lambda size: meter.spend(20 * size)))  # set passes
    subsets = _Subsets(nfa, accept, meter)
    rows, accepts = subsets.run(entry)
    live = _coreachable(rows, accepts)
    if 0 not in live:
        unescaped = ' without ", \\ or control characters' if json_string else ""
        raise RegexError(f"the pattern matches no string{unescaped}")
    order = sorted(live)  # the start state, 0, stays 0
    if len(order) == len(rows):
        table = tuple(itertools.chain.from_iterable(rows))
    else:
        index = {old: new for new, old in enumerate(order)}
        table = tuple(index.get(t, -1) for old in order for t in rows[old])
    ends = tuple(accepts[old] and all(t not in live for t in rows[old]) for old in order)
    return Regex(pattern, json_string, 0, subsets.classes, subsets.width, table,
                 tuple(accepts[old] for old in order), ends)


class _Meter:
    """One compile's steps and DFA states, held to MAX_WORK and MAX_DFA_STATES and drawn from the
    request's budget, if any, as they are spent. Each caller weighs its work so that a step is
    0.1 to 0.3 us of it, as measured on the patterns of tests/engine/test_regex_dfa.py's COSTLY."""

    def __init__(self, budget: RegexBudget | None):
        self.budget = budget
        self.work = 0
        self.states = 0

    def spend(self, work: int) -> None:
        self.work += work
        if self.work > MAX_WORK:
            raise RegexError(f"the pattern is too complex: its automaton takes over {MAX_WORK} steps to build")
        if self.budget is not None:
            self.budget.draw(work=work)

    def new_state(self) -> None:
        self.states += 1
        if self.states > MAX_DFA_STATES:
            raise RegexError(f"the pattern needs more than {MAX_DFA_STATES} automaton states")
        if self.budget is not None:
            self.budget.draw(states=1)


class _Recent:
    """The Regexes compiled last, by (pattern, json_string), least recent first: at most `entries`
    of them with at most `cells` table entries together. Safe to share between threads."""

    def __init__(self, entries: int, cells: int):
        self.entries = entries
        self.cells = cells
        self.held: OrderedDict[tuple[str, bool], Regex] = OrderedDict()
        self.held_cells = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[str, bool]) -> Regex | None:
        with self.lock:
            regex = self.held.get(key)
            if regex is not None:
                self.held.move_to_end(key)
            return regex

    def put(self, key: tuple[str, bool], regex: Regex) -> None:
        with self.lock:
            if key in self.held or len(regex.table) > self.cells:
                return
            self.held[key] = regex
            self.held_cells += len(regex.table)
            while len(self.held) > self.entries or self.held_cells > self.cells:
                self.held_cells -= len(self.held.popitem(last=False)[1].table)


_RECENT = _Recent(CACHE_ENTRIES, CACHE_CELLS)


# -- UTF-8 ---------------------------------------------------------------------------------------


def _minus(ranges: Ranges, removed: Ranges) -> Ranges:
    return complement(union(complement(ranges), removed))


def _utf8_sequences(ranges: Ranges) -> list[tuple[tuple[int, int], ...]]:
    """The UTF-8 encodings of `ranges` (no surrogates in them) as sequences of byte ranges, each
    matching exactly the byte strings b1..bn with every bi in its range. A range is cut until all
    its code points have one encoded length and each byte after the first that differs between
    its ends is free over 80..BF: then the product of the byte ranges is exact."""
    out = []
    todo = list(reversed(ranges))
    while todo:
        lo, hi = todo.pop()
        cut = _cut(lo, hi)
        if cut is None:
            out.append(tuple(zip(chr(lo).encode(), chr(hi).encode())))
        else:
            todo += [(cut + 1, hi), (lo, cut)]
    return out


def _cut(lo: int, hi: int) -> int | None:
    """Where [lo, hi] must be split into [lo, cut] and [cut + 1, hi]; None if it need not be."""
    if hi <= 0x7F:
        return None
    for last in (0x7F, 0x7FF, 0xFFFF):  # the last code points of 1-, 2- and 3-byte encodings
        if lo <= last < hi:
            return last
    for tail in (1, 2, 3):  # the last `tail` bytes hold the low 6 * tail bits
        low_bits = (1 << 6 * tail) - 1
        if lo & ~low_bits != hi & ~low_bits:  # the ends differ before those bytes
            if lo & low_bits:
                return lo | low_bits
            if hi & low_bits != low_bits:
                return (hi & ~low_bits) - 1
    return None


# -- automata ------------------------------------------------------------------------------------


class _Nfa:
    """Thompson NFA over byte ranges. `edges[s]`: (lo, hi, target) moves on one byte in lo..hi;
    `empty[s]`: targets reached without reading one. Code points outside the alphabet (surrogates,
    and for a JSON string the escaped characters) are left out of every set as it is built. Each
    state, edge and encoded range is a step on `meter`."""

    def __init__(self, removed: Ranges, meter: _Meter):
        self.removed = removed
        self.meter = meter
        self.encodings: dict[Ranges, list[tuple[tuple[int, int], ...]]] = {}  # a repeated item's, once
        self.edges: list[list[tuple[int, int, int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern expands to more than {MAX_NFA_STATES} automaton states")
        self.meter.spend(16)  # and the building around it
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def build(self, node: Node) -> tuple[int, int]:
        """A new fragment for `node`: (entry, out), its first and last states, out with no moves yet.
        Counted repetition builds its item once per copy."""
        match node:
            case Chars(ranges):
                return self.chars(ranges)
            case Concat(items):
                entry = out = self.state()
                for item in items:
                    out = self.then(out, item)
                return entry, out
            case Alternation(options):
                entry, out = self.state(), self.state()
                for option in options:
                    first, last = self.build(option)
                    self.empty[entry].append(first)
                    self.empty[last].append(out)
                return entry, out
            case Repeat(item, least, most):
                entry = out = self.state()
                for _ in range(least):
                    out = self.then(out, item)
                if most is None:  # a loop: out -> item -> back to out
                    first, last = self.build(item)
                    self.empty[out].append(first)
                    self.empty[last].append(out)
                    return entry, out
                end = self.state()
                for _ in range(most - least):  # optional copies, each able to stop at `end`
                    self.empty[out].append(end)
                    out = self.then(out, item)
                self.empty[out].append(end)
                return entry, end
        raise TypeError(node)

    def then(self, out: int, item: Node) -> int:
        """A fragment for `item` after state `out`; returns the fragment's out."""
        first, last = self.build(item)
        self.empty[out].append(first)
        return last

    def chars(self, ranges: Ranges) -> tuple[int, int]:
        """One code point of `ranges`, as UTF-8: a path per byte-range sequence, the paths that end
        alike sharing their states (so "one continuation byte to go" is one state, not dozens)."""
        entry, out = self.state(), self.state()
        if ranges not in self.encodings:
            self.meter.spend(40 + 8 * len(ranges))
            self.encodings[ranges] = _utf8_sequences(_minus(ranges, self.removed))
        self.meter.spend(2 * len(self.encodings[ranges]))  # edges
        tails: dict[tuple[tuple[int, int], ...], int] = {}
        for sequence in self.encodings[ranges]:
            target = out
            for k in range(len(sequence) - 1, 0, -1):
                tail = sequence[k:]
                if tail not in tails:
                    tails[tail] = self.state()
                    self.edges[tails[tail]].append((*sequence[k], target))
                target = tails[tail]
            self.edges[entry].append((*sequence[0], target))
        return entry, out


class _Subsets:
    """Subset construction over byte classes: `classes` maps a byte to its class, `run` the DFA.
    A DFA state keeps only the NFA states that read a byte or accept, so sets that differ in
    pass-through states alone are one state. Steps on `meter`: each move made and each visited,
    each NFA state a closure passes, a row (`width` steps) per DFA state."""

    def __init__(self, nfa: _Nfa, accept: int, meter: _Meter):
        self.nfa = nfa
        self.accept = accept
        self.meter = meter
        edges = [edge for state_edges in nfa.edges for edge in state_edges]
        cuts = sorted({lo for lo, _, _ in edges} | {hi + 1 for _, hi, _ in edges} | {0, 256})  # a class: cut to cut
        classes = bytearray(256)
        for number, (lo, end) in enumerate(zip(cuts, cuts[1:])):
            classes[lo:end] = bytes([number]) * (end - lo)
        self.classes = bytes(classes)
        self.width = len(cuts) - 1
        self.moves: list[list[tuple[int, int]]] = []  # moves[s]: (class, target) for every class s reads
        for state_edges in nfa.edges:
            meter.spend(2 + 2 * sum(classes[hi] - classes[lo] + 2 for lo, hi, _ in state_edges))  # moves, edges
            self.moves.append([(c, t) for lo, hi, t in state_edges for c in range(classes[lo], classes[hi] + 1)])
        self.closures: dict[frozenset[int], frozenset[int]] = {}

    def closure(self, states: frozenset[int]) -> frozenset[int]:
        """The DFA state of `states` and all they reach without reading a byte."""
        hit = self.closures.get(states)
        if hit is None:
            seen, todo, steps = set(states), list(states), len(states)
            while todo:
                targets = self.nfa.empty[todo.pop()]
                steps += len(targets)
                for target in targets:
                    if target not in seen:
                        seen.add(target)
                        todo.append(target)
            self.meter.spend(4 * steps)
            hit = frozenset(s for s in seen if self.moves[s] or s == self.accept)
            self.closures[states] = hit
        return hit

    def run(self, entry: int) -> tuple[list[list[int]], list[bool]]:
        """(rows: next DFA state by class, -1 for none; which states accept), state 0 the start."""
        sets = [self.closure(frozenset((entry,)))]
        ids = {sets[0]: 0}
        rows: list[list[int]] = []
        self.meter.new_state()
        for current in sets:  # grows as new sets are found
            self.meter.spend(16 + self.width + sum(len(self.moves[state]) for state in current))  # row, moves
            by_class: dict[int, set[int]] = {}
            for state in current:
                for c, target in self.moves[state]:
                    by_class.setdefault(c, set()).add(target)
            row = [-1] * self.width
            for c, targets in by_class.items():
                reached = self.closure(frozenset(targets))
                if reached not in ids:
                    self.meter.new_state()
                    ids[reached] = len(sets)
                    sets.append(reached)
                row[c] = ids[reached]
            rows.append(row)
        return rows, [self.accept in s for s in sets]


def _coreachable(rows: list[list[int]], accepts: list[bool]) -> set[int]:
    """The states from which some path reaches an accepting state."""
    sources: list[list[int]] = [[] for _ in rows]
    for state, row in enumerate(rows):
        for target in set(row):
            if target >= 0:
                sources[target].append(state)
    live = {s for s, a in enumerate(accepts) if a}
    todo = list(live)
    while todo:
        for source in sources[todo.pop()]:
            if source not in live:
                live.add(source)
                todo.append(source)
    return live


# -- integer ranges ------------------------------------------------------------------------------


def integer_range(minimum: int | None, maximum: int | None) -> str:
    """Pattern source for the JSON integer texts of minimum..maximum, inclusive (None: unbounded
    on that side): an optional "-", no leading zeros, no "-0", no "+". Digits are written [0-9],
    so the source means the same under any flags; it is an alternation, to be wrapped in (?:...)
    before anything is put beside it. Raises RegexError if minimum > maximum, or if a bound has
    more than MAX_INTEGER_DIGITS digits (the DFA of a range much wider outgrows MAX_DFA_STATES)."""
    for bound in (minimum, maximum):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool)):
            raise RegexError(f"an integer bound must be an int, not {bound!r}")
        if bound is not None and abs(bound) >= 10**MAX_INTEGER_DIGITS:
            raise RegexError(f"integer bounds of more than {MAX_INTEGER_DIGITS} digits are not supported")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise RegexError(f"minimum {minimum} is above maximum {maximum}")
    options = []
    if minimum is None or minimum < 0:  # the negatives, by their magnitudes
        nearest = 1 if maximum is None or maximum >= 0 else -maximum
        options.append("-" + _group(_naturals(nearest, None if minimum is None else -minimum)))
    if maximum is None or maximum >= 0:
        options.append(_naturals(0 if minimum is None else max(minimum, 0), maximum))
    return "|".join(options)


def _naturals(lo: int, hi: int | None) -> str:
    """Source for the numerals of lo..hi (None: no end) without leading zeros, by length: lo's
    length, the lengths strictly between (any digits), hi's length."""
    low = str(lo)
    longest = None if hi is None else len(str(hi))
    options = [_between(low, str(hi) if longest == len(low) else "9" * len(low))]
    if longest is None:
        options.append(f"[1-9][0-9]{{{len(low)},}}")
    elif longest > len(low):
        if longest - 1 > len(low):
            options.append("[1-9]" + _digits(len(low), longest - 2))
        options.append(_between("1" + "0" * (longest - 1), str(hi)))
    return "|".join(options)


def _between(low: str, high: str) -> str:
    """Source for the numerals low..high, written with as many digits as both have."""
    if not low:
        return ""
    if low[0] == high[0]:
        return low[0] + _group(_between(low[1:], high[1:]))
    rest = len(low) - 1
    first, last = int(low[0]), int(high[0])
    options = []
    if low[1:] != "0" * rest:  # low's first digit, followed by only the tails from low's
        options.append(low[0] + _group(_between(low[1:], "9" * rest)))
        first += 1
    high_partial = high[1:] != "9" * rest
    if high_partial:
        last -= 1
    if first <= last:  # first digits followed by any tail
        options.append((str(first) if first == last else f"[{first}-{last}]") + _digits(rest, rest))
    if high_partial:
        options.append(high[0] + _group(_between("0" * rest, high[1:])))
    return "|".join(options)


def _digits(least: int, most: int) -> str:
    if least == most:
        return "" if least == 0 else "[0-9]" if least == 1 else f"[0-9]{{{least}}}"
    return f"[0-9]{{{least},{most}}}"


def _group(source: str) -> str:
    return f"(?:{source})" if "|" in source else source
