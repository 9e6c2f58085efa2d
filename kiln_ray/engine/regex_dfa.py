"""Regular expressions as byte-level DFAs, for guided decoding: which bytes may come next.

`compile_regex(pattern)` turns a pattern (the subset kiln_ray/engine/regex_syntax.py parses) into a
`Regex`, a table of DFA states over bytes. It accepts exactly the UTF-8 encodings of the strings
`s` for which `re.fullmatch(pattern, s, re.ASCII)` matches (ASCII: `\\d \\w \\s` are ASCII classes),
and keeps a prefix alive only if some continuation is accepted, so a guide that follows `step`
never writes itself into a corner. Only valid UTF-8 is accepted or kept alive: no surrogates,
nothing past U+10FFFF, no overlong forms.

json_string=True reads the raw content bytes of a JSON string (between the quotes), written
unescaped: `"`, `\\` and U+0000-U+001F, which a JSON string can only hold escaped, are taken out of
every literal and class, so a pattern that needs them cannot match those strings. A pattern that
matches no string at all (with or without json_string) is a RegexError.

Bounds, since a pattern comes from a client and the engine's step thread compiles it:
MAX_PATTERN characters, MAX_NFA_STATES once counted repetition is expanded, MAX_DFA_STATES, and
MAX_WORK for the subset construction (whose sets can be large while the DFA stays small, as in
`(?:a?){1000}`). Past any of them compile_regex raises RegexError rather than work on: about
50 ms of compiling at most. `.{0,250}` (2001 states) is about the longest bounded length that fits.

    pattern --parse--> tree of code point sets --_Nfa--> Thompson NFA over byte ranges
            --_Subsets--> DFA over byte classes --drop states that cannot accept--> Regex

`integer_range` writes the pattern of the JSON integers between two bounds. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln_ray.engine.regex_syntax import (
    Alternation, Chars, Concat, Node, Ranges, RegexError, Repeat, complement, parse, union,
)

__all__ = ["Regex", "RegexError", "compile_regex", "integer_range"]

MAX_PATTERN = 4096  # characters
MAX_NFA_STATES = 10_000
MAX_DFA_STATES = 2048
MAX_WORK = 100_000  # NFA states the subset construction visits

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


def compile_regex(pattern: str, *, json_string: bool = False) -> Regex:
    """The DFA of `pattern` (see the module docstring); raises RegexError."""
    if not isinstance(pattern, str):
        raise RegexError(f"a pattern must be a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"the pattern is longer than {MAX_PATTERN} characters")
    nfa = _Nfa(union(_SURROGATES, _JSON_ESCAPED) if json_string else _SURROGATES)
    entry, accept = nfa.build(parse(pattern))
    subsets = _Subsets(nfa, accept)
    rows, accepts = subsets.run(entry)
    live = _coreachable(rows, accepts)
    if 0 not in live:
        unescaped = ' without ", \\ or control characters' if json_string else ""
        raise RegexError(f"the pattern matches no string{unescaped}")
    order = sorted(live)  # the start state, 0, stays 0
    index = {old: new for new, old in enumerate(order)}
    table = tuple(index.get(t, -1) for old in order for t in rows[old])
    ends = tuple(accepts[old] and all(t not in live for t in rows[old]) for old in order)
    return Regex(pattern, json_string, 0, subsets.classes, subsets.width, table,
                 tuple(accepts[old] for old in order), ends)


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
    and for a JSON string the escaped characters) are left out of every set as it is built."""

    def __init__(self, removed: Ranges):
        self.removed = removed
        self.encodings: dict[Ranges, list[tuple[tuple[int, int], ...]]] = {}  # a repeated item's, once
        self.edges: list[list[tuple[int, int, int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern expands to more than {MAX_NFA_STATES} automaton states")
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
            self.encodings[ranges] = _utf8_sequences(_minus(ranges, self.removed))
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
    pass-through states alone are one state. Work is counted against MAX_WORK."""

    def __init__(self, nfa: _Nfa, accept: int):
        self.nfa = nfa
        self.accept = accept
        edges = [edge for state_edges in nfa.edges for edge in state_edges]
        cuts = sorted({lo for lo, _, _ in edges} | {hi + 1 for _, hi, _ in edges} | {0, 256})  # a class: cut to cut
        classes = bytearray(256)
        for number, (lo, end) in enumerate(zip(cuts, cuts[1:])):
            classes[lo:end] = bytes([number]) * (end - lo)
        self.classes = bytes(classes)
        self.width = len(cuts) - 1
        # moves[s]: (class, target) for every class an edge of NFA state s reads
        self.moves = [[(c, t) for lo, hi, t in state_edges for c in range(classes[lo], classes[hi] + 1)]
                      for state_edges in nfa.edges]
        self.closures: dict[frozenset[int], frozenset[int]] = {}
        self.work = 0

    def spend(self, visits: int) -> None:
        self.work += visits
        if self.work > MAX_WORK:
            raise RegexError(f"the pattern is too complex: its automaton takes over {MAX_WORK} steps to build")

    def closure(self, states: frozenset[int]) -> frozenset[int]:
        """The DFA state of `states` and all they reach without reading a byte."""
        hit = self.closures.get(states)
        if hit is None:
            seen, todo = set(states), list(states)
            while todo:
                for target in self.nfa.empty[todo.pop()]:
                    if target not in seen:
                        seen.add(target)
                        todo.append(target)
            self.spend(len(seen))
            hit = frozenset(s for s in seen if self.moves[s] or s == self.accept)
            self.closures[states] = hit
        return hit

    def run(self, entry: int) -> tuple[list[list[int]], list[bool]]:
        """(rows: next DFA state by class, -1 for none; which states accept), state 0 the start."""
        sets = [self.closure(frozenset((entry,)))]
        ids = {sets[0]: 0}
        rows: list[list[int]] = []
        for current in sets:  # grows as new sets are found
            self.spend(len(current))
            by_class: dict[int, set[int]] = {}
            for state in current:
                for c, target in self.moves[state]:
                    by_class.setdefault(c, set()).add(target)
            row = [-1] * self.width
            for c, targets in by_class.items():
                reached = self.closure(frozenset(targets))
                if reached not in ids:
                    if len(sets) >= MAX_DFA_STATES:
                        raise RegexError(f"the pattern needs more than {MAX_DFA_STATES} automaton states")
                    ids[reached] = len(sets)
                    sets.append(reached)
                row[c] = ids[reached]
            rows.append(row)
        return rows, [self.accept in s for s in sets]


def _coreachable(rows: list[list[int]], accepts: list[bool]) -> set[int]:
    """The states from which some path reaches an accepting state."""
    sources: list[list[int]] = [[] for _ in rows]
    for state, row in enumerate(rows):
        for target in row:
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
    before anything is put beside it. Raises RegexError if minimum > maximum."""
    for bound in (minimum, maximum):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool)):
            raise RegexError(f"an integer bound must be an int, not {bound!r}")
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
