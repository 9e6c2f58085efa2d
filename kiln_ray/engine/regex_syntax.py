"""Regular expression syntax: a pattern (the subset below, with Python's meaning) as a tree of
code point sets, for kiln_ray/engine/regex_dfa.py to compile.

Supported: literals and escaped metacharacters; `\\d \\D \\w \\W \\s \\S` (below); `\\n \\t \\r \\f
\\v \\a \\0 \\ooo \\xHH \\uHHHH \\UHHHHHHHH \\N{name}`; `.` (any code point but `\\n`; with parse's
`ecma`, none of ECMA-262's line terminators `\\n \\r` U+2028 U+2029); classes `[...]` and `[^...]`
with ranges and escapes; groups `(...)`, `(?:...)` and `(?P<name>...)` (a plain group here); `|`;
`* + ? {m} {m,} {,n} {m,n}` and their lazy forms (laziness does not change which strings match in
full); `^` as the first character and `$` as the last (no-ops for a full match). Refused with
RegexError: backreferences, lookaround, other `(?...)` extensions (inline flags, comments, atomic
and conditional groups), `\\b \\B \\A \\Z`, possessive quantifiers, `^` or `$` anywhere else, counts
above MAX_REPEAT and groups nested deeper than MAX_DEPTH.

Classes mean what they mean under every reading a client may check the text with: re.ASCII
(`\\d \\w \\s` ASCII), re without it (Unicode: `\\d` any decimal digit, `\\w` any letter or digit, `\\s`
any space) and ECMA-262, JSON Schema's (`\\d \\w` ASCII, `\\s` its WhiteSpace and LineTerminator). A
class (an escape, or a whole `[...]`) is worked out under each and holds the code points it holds
under all three: `\\d` is ASCII `[0-9]`, `\\D` leaves out every Unicode digit, `[^\\W]` is ASCII
`[0-9A-Za-z_]`. So whatever reading a client uses, a text of the tree matches the pattern; the price
is that a class may hold less than one reading alone gives it (`\\D` never matches "٣", and the text
of `\\d|\\D` is ASCII digits or no digit at all). The Unicode sets are those of this Python's
unicodedata (a validator on a newer Unicode may know a few more digits and letters), taken from
`re` itself on first use: about 0.1 s, once a process.

A complemented class (`[^...]`, or one holding `\\D \\W \\S`) that leaves out more than MAX_FINE_GAPS
separate ranges outside _EXACT, as `\\W` does (the letters of every script), leaves out whole each
64-code-point block there that it leaves out anything of (a block: code points whose UTF-8 differs
only in the last byte). _EXACT is where most punctuation and symbols live: below U+0800, U+2000 to
U+2BFF (punctuation, currency, arrows, mathematics, box drawing, dingbats), CJK punctuation and the
fullwidth forms. Stricter, never looser: `\\W` then costs about 60 DFA states a character instead
of 310, and loses the punctuation that shares a block with a script's letters (Devanagari's danda
।, for one). `\\D` and `\\S` leave out few ranges and stay exact.

The parser follows Python's own (re._parser) where the subsets overlap, quirks included: a `{`
that does not open a valid count is a literal, a `]` first in a class is a member, `{,n}` is
`{0,n}`, `\\1` to `\\7` followed by two octal digits is an octal escape.
"""

from __future__ import annotations

import array
import functools
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

MAX_REPEAT = 10_000  # a count in {m,n}
MAX_DEPTH = 64  # nested groups
MAX_CODE_POINT = 0x10FFFF
MAX_FINE_GAPS = 128  # ranges a complemented class may leave out beyond _EXACT before it is coarsened

Ranges = tuple[tuple[int, int], ...]  # code points, inclusive, sorted and disjoint

_ASCII_CLASSES: dict[str, Ranges] = {
    "d": ((0x30, 0x39),),
    "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
    "s": ((0x09, 0x0D), (0x20, 0x20)),
}
_ECMA_SPACE: Ranges = (  # WhiteSpace and LineTerminator, ECMA-262 (2024) 12.2 and 12.3
    (0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
    (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF),
)
_EXACT: Ranges = ((0, 0x7FF), (0x2000, 0x2BFF), (0x3000, 0x303F), (0xFF00, 0xFFFF))  # ends 64-aligned
_LINE_FEED: Ranges = ((0x0A, 0x0A),)
_ECMA_LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_OCTAL = "01234567"
_OCTAL_PAIRS = {a + b for a in _OCTAL for b in _OCTAL}  # after \1 to \7: an octal escape, not a group
_COUNT = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")
_REFUSED_EXTENSIONS = {  # what follows "(?", longest first
    "P=": "backreferences (?P=name) are not supported",
    "<=": "lookbehind assertions (?<=...) are not supported",
    "<!": "lookbehind assertions (?<!...) are not supported",
    "<": "named groups other than (?P<name>...) are not supported",
    "=": "lookahead assertions (?=...) are not supported",
    "!": "lookahead assertions (?!...) are not supported",
    ">": "atomic groups (?>...) are not supported",
    "(": "conditional groups (?(...)...) are not supported",
    "#": "comments (?#...) are not supported",
}


class RegexError(ValueError):
    """The pattern cannot be enforced: malformed, outside the subset, too big, or matching nothing."""


# The tree: a pattern is one of these, nested.


@dataclass(frozen=True)
class Chars:
    ranges: Ranges  # one code point from these


@dataclass(frozen=True)
class Concat:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alternation:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    least: int
    most: int | None  # None: unbounded


Node = Chars | Concat | Alternation | Repeat
EMPTY = Concat(())


def parse(pattern: str, *, ecma: bool = False, spend: Callable[[int], None] | None = None) -> Node:
    """The tree of `pattern`; raises RegexError. ecma: `.` matches no ECMA-262 line terminator.
    spend(n) is told the size of each code point set the parser works out (a class can hold
    hundreds of ranges), and may raise RegexError to stop it."""
    return _Parser(pattern, ecma, spend or (lambda work: None)).parse()


@dataclass(frozen=True)
class _Class:
    """A class escape (`\\d` and the like) under each reading: re.ASCII, re's Unicode, ECMA-262."""

    readings: tuple[Ranges, Ranges, Ranges]
    agreed: Ranges  # in all three (coarsened, if complemented)
    complemented: bool  # \\D \\W \\S


@functools.cache
def _class_escape(letter: str) -> _Class:
    """`\\d \\D \\w \\W \\s \\S`, by their letter."""
    kind = letter.lower()
    readings = (_ASCII_CLASSES[kind], _unicode_classes()[kind], _ECMA_SPACE if kind == "s" else _ASCII_CLASSES[kind])
    if letter.islower():
        return _Class(readings, intersection(*readings), False)
    readings = tuple(complement(r) for r in readings)
    return _Class(readings, _coarsened(intersection(*readings)), True)


def _coarsened(ranges: Ranges) -> Ranges:
    """A complemented class's set, cut down as the module docstring says."""
    gaps = tuple((lo & ~0x3F, hi | 0x3F) for lo, hi in intersection(complement(ranges), complement(_EXACT)))
    if len(gaps) <= MAX_FINE_GAPS:
        return ranges
    return intersection(ranges, complement(gaps))  # the gaps, blocks whole, stay outside _EXACT


@functools.cache
def _unicode_classes() -> dict[str, Ranges]:
    """`\\d \\w \\s` as re reads them without re.ASCII: the runs re finds in a text of every code point."""
    every = array.array("I", range(MAX_CODE_POINT + 1)).tobytes()  # "I": 4 bytes on every platform CPython runs on
    text = every.decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be", "surrogatepass")
    return {kind: tuple((m.start(), m.end() - 1) for m in re.finditer(rf"\{kind}+", text)) for kind in "dws"}


class _Parser:
    """Recursive descent; `pos` is the next character to read, `names` the group names seen."""

    def __init__(self, pattern: str, ecma: bool, spend: Callable[[int], None]):
        self.text = pattern
        self.pos = 0
        self.depth = 0
        self.names: set[str] = set()
        self.dot = complement(_ECMA_LINE_TERMINATORS if ecma else _LINE_FEED)
        self.spend = spend

    def error(self, message: str) -> RegexError:
        return RegexError(f"{message} (at position {self.pos} of the pattern)")

    def peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def eat(self, prefix: str) -> bool:
        if self.text.startswith(prefix, self.pos):
            self.pos += len(prefix)
            return True
        return False

    def take(self, unterminated: str) -> str:
        char = self.peek()
        if not char:
            raise self.error(unterminated)
        self.pos += 1
        return char

    def parse(self) -> Node:
        self.eat("^")
        tree = self.alternation()
        if self.pos < len(self.text):  # only a ")" ends an alternation early
            raise self.error("unbalanced parenthesis")
        return tree

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.eat("|"):
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alternation(tuple(options))

    def sequence(self) -> Node:
        items: list[Node] = []
        while self.peek() not in ("", "|", ")"):
            if self.quantifier() is not None:
                raise self.error("nothing to repeat")
            item = self.atom()
            bounds = self.quantifier()
            if bounds is not None:
                if self.eat("+"):
                    raise self.error("possessive quantifiers are not supported")
                self.eat("?")  # lazy: the same strings match in full
                if self.quantifier() is not None:
                    raise self.error("multiple repeat")
                item = Repeat(item, *bounds)
            items.append(item)
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def quantifier(self) -> tuple[int, int | None] | None:
        """Reads a quantifier and returns its (least, most); None, reading nothing, if none is here."""
        simple = {"*": (0, None), "+": (1, None), "?": (0, 1)}.get(self.peek())
        if simple is not None:
            self.pos += 1
            return simple
        count = _COUNT.match(self.text, self.pos)
        if count is None or not (count[1] or count[2]):  # "{}" is a literal, as in Python
            return None
        self.pos = count.end()
        least = int(count[1] or 0)
        most = int(count[3]) if count[3] else (None if count[2] else least)
        if max(least, most or 0) > MAX_REPEAT:
            raise self.error(f"a repetition count above {MAX_REPEAT}")
        if most is not None and most < least:
            raise self.error("min repeat greater than max repeat")
        return least, most

    def atom(self) -> Node:
        char = self.take("unexpected end of pattern")
        if char == "(":
            return self.group()
        if char == "[":
            return Chars(self.char_class())
        if char == ".":
            return Chars(self.dot)
        if char == "\\":
            value = self.escape(in_class=False)
            return Chars(value.agreed if isinstance(value, _Class) else ((value, value),))
        if char == "$":
            if self.pos == len(self.text):
                return EMPTY
            raise self.error("$ is supported only as the pattern's last character")
        if char == "^":
            raise self.error("^ is supported only as the pattern's first character")
        return Chars(((ord(char), ord(char)),))

    def group(self) -> Node:
        if self.eat("?"):
            if self.eat("P<"):
                end = self.text.find(">", self.pos)
                name = self.text[self.pos:end] if end >= 0 else ""
                if not name.isidentifier():
                    raise self.error("bad group name")
                if name in self.names:
                    raise self.error(f"redefinition of group name {name!r}")
                self.names.add(name)
                self.pos = end + 1
            elif not self.eat(":"):
                rest = self.text[self.pos:]
                refusal = next((m for p, m in _REFUSED_EXTENSIONS.items() if rest.startswith(p)), None)
                if refusal is None and rest[:1] and rest[0] in "aiLmsux-":
                    refusal = "inline flags (?aiLmsux) are not supported"
                raise self.error(refusal or "unknown extension (?" + rest[:1])
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"groups nest deeper than {MAX_DEPTH} levels")
        inner = self.alternation()
        if not self.eat(")"):
            raise self.error("missing ), unterminated subpattern")
        self.depth -= 1
        return inner

    def char_class(self) -> Ranges:
        """The code points of `[...]` under all three readings (see the module docstring)."""
        negate = self.eat("^")
        members: list[int | _Class | tuple[int, int]] = []  # code points, class escapes, ranges
        while True:
            char = self.take("unterminated character set")
            if char == "]" and members:
                break
            first = self.escape(in_class=True) if char == "\\" else ord(char)
            if not self.eat("-"):
                members.append(first)
                continue
            char = self.take("unterminated character set")
            if char == "]":  # a trailing "-" is a member
                members += [first, 0x2D]
                break
            last = self.escape(in_class=True) if char == "\\" else ord(char)
            if isinstance(first, _Class) or isinstance(last, _Class) or last < first:
                raise self.error("bad character range")
            members.append((first, last))
        literal = union(*(((m, m),) if isinstance(m, int) else (m,) for m in members if not isinstance(m, _Class)))
        escapes = [m.readings for m in members if isinstance(m, _Class)]  # a reading each
        if not escapes:  # one reading
            return _coarsened(complement(literal)) if negate else literal
        self.spend(sum(len(ranges) for readings in escapes for ranges in readings))
        readings = [union(literal, *column) for column in zip(*escapes)]
        ranges = complement(union(*readings)) if negate else intersection(*readings)
        complemented = negate or any(m.complemented for m in members if isinstance(m, _Class))
        return _coarsened(ranges) if complemented else ranges

    def escape(self, in_class: bool) -> int | _Class:
        """After a backslash: one code point, or a class (\\d and the like)."""
        char = self.take("bad escape (end of pattern)")
        if char in "dDwWsS":
            return _class_escape(char)
        if char == "b" and in_class:
            return 0x08
        if char in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[char]
        # Outside a class, \\1 to \\7 are octal only with two more octal digits; else groups.
        octal = char in _OCTAL and (in_class or char == "0" or self.text[self.pos:self.pos + 2] in _OCTAL_PAIRS)
        if char in "0123456789" and not octal and not in_class:
            raise self.error(f"backreferences (\\{char}) are not supported")
        if char in "AZbB" and not in_class:
            raise self.error(f"\\{char} (an anchor or word boundary) is not supported")
        if char in _HEX_DIGITS or char == "N" or octal:
            return self.numeric_escape(char)
        if char.isascii() and char.isalnum():
            raise self.error(f"bad escape \\{char}")
        return ord(char)

    def numeric_escape(self, char: str) -> int:
        """The code point of \\x, \\u, \\U, \\N{name} or an octal escape, `char` its first letter or digit."""
        if char in _HEX_DIGITS:
            digits = self.text[self.pos:self.pos + _HEX_DIGITS[char]]
            if len(digits) < _HEX_DIGITS[char] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"incomplete escape \\{char}{digits}")
            self.pos += len(digits)
            return self.code_point(int(digits, 16))
        if char == "N":
            end = self.text.find("}", self.pos)
            if not self.eat("{") or end < 0:
                raise self.error("\\N must be followed by {name}")
            name, self.pos = self.text[self.pos:end], end + 1
            try:
                return ord(unicodedata.lookup(name))
            except KeyError:
                raise self.error(f"undefined character name {name!r}") from None
        digits = char
        while len(digits) < 3 and self.peek() and self.peek() in _OCTAL:
            digits += self.take("")
        return self.code_point(int(digits, 8), limit=0o377)

    def code_point(self, value: int, limit: int = MAX_CODE_POINT) -> int:
        if value > limit:
            raise self.error(f"escape value {value:#x} is out of range")
        return value


# -- code point sets -----------------------------------------------------------------------------


def union(*sets: Ranges) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in sorted(r for s in sets for r in s):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def intersection(*sets: Ranges) -> Ranges:
    return complement(union(*(complement(s) for s in sets)))


def complement(ranges: Ranges) -> Ranges:
    out, low = [], 0
    for lo, hi in union(ranges):
        if lo > low:
            out.append((low, lo - 1))
        low = hi + 1
    if low <= MAX_CODE_POINT:
        out.append((low, MAX_CODE_POINT))
    return tuple(out)
