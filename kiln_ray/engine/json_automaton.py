"""The automaton under kiln_ray/engine/json_grammar.py: the nodes a schema compiles to, and how
a stack of frames (one parse alternative) steps over one byte. Plain data and functions, no
torch; `step` adds every stack the byte can lead to, `finishes` and `at_an_end` say whether a
stack has read a whole document."""

from __future__ import annotations

from dataclasses import dataclass

from kiln_ray.engine.regex_dfa import Regex

Frame = tuple
Stack = tuple[Frame, ...]
State = frozenset  # of Stack

MAX_WHITESPACE = 32
MAX_DEPTH = 64  # nesting of objects and arrays in one document
UNBOUNDED = 1 << 30  # room of a string without maxLength
MAX_NUMBER_DIGITS = 20  # of a number's integer part, and of its fraction (uint64 has 20; 0.1 + 0.2 prints 17)
MAX_EXPONENT_DIGITS = 3
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_WS = frozenset(b" \t\n")
_DIGITS = frozenset(b"0123456789")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_HEX = frozenset(b"0123456789abcdefABCDEF")
# UTF-8 lead byte -> (bytes still to come, range of the next one): no overlong forms, no
# surrogates, nothing past U+10FFFF (what Python's strict decoder accepts).
_UTF8_LEADS = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF), **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF), **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F),
}


@dataclass
class Node:
    types: frozenset[str] = frozenset(TYPES)
    properties: tuple[tuple[bytes, int], ...] = ()  # (JSON-encoded key, value node), in order
    required: frozenset[int] = frozenset()  # indexes into properties
    free_values: int | None = None  # objects without properties: node of every value (None: no such objects)
    items: int = 0  # node of array items (0 is the any-value node)
    min_items: int = 0
    max_items: int | None = None
    literals: tuple[bytes, ...] | None = None  # enum / const: the only texts allowed
    any_of: tuple[int, ...] = ()
    min_length: int = 0  # of strings, in code points
    max_length: int | None = None
    pattern: Regex | None = None  # strings: their content matches it (JSON Schema: a search)
    regex: Regex | None = None  # numbers: their text matches it (integer bounds; guided_regex at the top)

    @property
    def bounded_string(self) -> bool:
        return self.min_length > 0 or self.max_length is not None or self.pattern is not None


# -- the automaton ---------------------------------------------------------------------------
# Frames:
#   ("V", node)                        a value of `node` starts with the next byte
#   ("L", text, pos)                   the literal `text`, `pos` bytes of it read
#   ("S", mode)                        inside a string: 0 plain, 1 after a backslash, 2-5 \u digits left + 1
#   ("S", 6, left, lo, hi)             inside a string, within a UTF-8 sequence (only valid UTF-8 is written)
#   ("N", integer, phase, digits)      a number (phases below); `digits` of its current part so far
#   ("O", node, next, phase, ws)       an object; `next`: index of the next candidate property
#   ("A", node, count, phase, ws)      an array of `count` items so far
# Number phases: 0 start, 1 after "-", 2 after a leading 0, 3 integer digits, 4 after ".",
# 5 fraction digits, 6 after e/E, 7 after the exponent sign, 8 exponent digits.
_NUMBER_DONE = frozenset({2, 3, 5, 8})


def finishes(nodes: list[Node], stack: Stack) -> bool:
    """Whether the stack is a finished-if-nothing-follows number (or regex text) and nothing else."""
    if len(stack) != 1:
        return False
    frame = stack[0]
    if frame[0] == "N":
        return frame[2] in _NUMBER_DONE
    return frame[0] == "X" and nodes[frame[1]].regex.accepting(frame[2])


def step(nodes: list[Node], stack: Stack, byte: int, out: set[Stack]) -> None:
    frame = stack[-1]
    rest = stack[:-1]
    kind = frame[0]
    if kind == "L":
        text, pos = frame[1], frame[2]
        if text[pos] == byte:
            out.add(rest if pos + 1 == len(text) else rest + (("L", text, pos + 1),))
    elif kind == "S":
        _step_string(frame, rest, byte, out)
    elif kind == "N":
        _step_number(nodes, frame, rest, byte, out)
    elif kind == "V":
        _start_value(nodes, frame[1], rest, byte, out)
    elif kind == "O":
        _step_object(nodes, frame, rest, byte, out)
    elif kind == "A":
        _step_array(nodes, frame, rest, byte, out)
    elif kind == "T":
        _step_bounded_string(nodes, frame, rest, byte, out)
    elif kind == "X":
        _step_regex(nodes, frame, rest, byte, out)


def _start_value(nodes: list[Node], index: int, rest: Stack, byte: int, out: set[Stack]) -> None:
    if len(rest) > MAX_DEPTH:
        return
    node = nodes[index]
    if node.literals is not None:
        for text in node.literals:
            if text[0] == byte:
                out.add(rest if len(text) == 1 else rest + (("L", text, 1),))
        return
    if node.any_of:
        for child in node.any_of:  # plain nodes only (_flatten_alternatives)
            _start_value(nodes, child, rest, byte, out)
        return
    types = node.types
    if byte == 0x7B and "object" in types:  # {
        out.add(rest + (("O", index, 0, "first", 0),))
    elif byte == 0x5B and "array" in types:  # [
        out.add(rest + (("A", index, 0, "first", 0),))
    elif byte == 0x22 and "string" in types:  # "
        if node.bounded_string:
            out.add(rest + (("T", index, 0, (0,), node.pattern.start if node.pattern else -1),))
        else:
            out.add(rest + (("S", 0),))
    elif byte == 0x74 and "boolean" in types:  # t
        out.add(rest + (("L", b"true", 1),))
    elif byte == 0x66 and "boolean" in types:  # f
        out.add(rest + (("L", b"false", 1),))
    elif byte == 0x6E and "null" in types:  # n
        out.add(rest + (("L", b"null", 1),))
    elif node.regex is not None and ("number" in types or "integer" in types):
        _step_regex(nodes, ("X", index, node.regex.start), rest, byte, out)
    elif "number" in types or "integer" in types:
        _step_number(nodes, ("N", "number" not in types, 0, 0), rest, byte, out)


def _step_string(frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    mode = frame[1]
    if mode == 0:
        if byte == 0x22:
            out.add(rest)
        elif byte == 0x5C:
            out.add(rest + (("S", 1),))
        elif 0x20 <= byte < 0x80:
            out.add(rest + (("S", 0),))
        elif byte in _UTF8_LEADS:
            out.add(rest + (("S", 6) + _UTF8_LEADS[byte],))
    elif mode == 6:  # inside a UTF-8 sequence: `left` bytes to come, the next in [lo, hi]
        left, lo, hi = frame[2], frame[3], frame[4]
        if lo <= byte <= hi:
            out.add(rest + ((("S", 0),) if left == 1 else (("S", 6, left - 1, 0x80, 0xBF),)))
    elif mode == 1:
        if byte in _ESCAPES:
            out.add(rest + (("S", 5 if byte == 0x75 else 0),))
    elif byte in _HEX:  # modes 5..2: that many hex digits of \uXXXX left, + 1
        out.add(rest + (("S", 0 if mode == 2 else mode - 1),))


def at_an_end(nodes: list[Node], stack: Stack) -> bool:
    """The stack is only a value at the top level that is complete and cannot go on: regex
    text (guided_regex, a bounded integer) the regex ends, or a number's exponent at its cap."""
    if len(stack) != 1:
        return False
    frame = stack[0]
    if frame[0] == "X":
        return nodes[frame[1]].regex.finished(frame[2])
    if frame[0] != "N":
        return False
    integer, phase, digits = frame[1], frame[2], frame[3]
    if phase == 8:
        return digits == MAX_EXPONENT_DIGITS
    return integer and (phase == 2 or (phase == 3 and digits == MAX_NUMBER_DIGITS))  # "0", or digits at the cap


def _step_bounded_string(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    """Inside a string with minLength / maxLength / pattern: `count` characters read so far
    (counted up to the limits only), `sub` the plain string frame's mode, `dfa` the pattern's
    state. A pattern's text is written as it is (regex_dfa's json_string: no escapes)."""
    _, index, count, sub, dfa = frame
    node = nodes[index]
    if sub == (0,):
        if byte == 0x22:
            if count >= node.min_length and (node.pattern is None or node.pattern.accepting(dfa)):
                out.add(rest)
            return
        if node.max_length is not None and count >= node.max_length:
            return
        count = min(count + 1, node.max_length if node.max_length is not None else node.min_length)
    # \uD800-\uDFFF: half of a surrogate pair, two escapes for one character; refused, so
    # lengths count true characters (such a character can come as UTF-8 instead).
    surrogate_next = sub == (5,) and byte in (0x44, 0x64)  # \uD: the next digit must be 0-7
    if sub == (4, "D") and not 0x30 <= byte <= 0x37:
        return
    inner: set[Stack] = set()
    _step_string(("S",) + sub, (), byte, inner)
    if node.pattern is not None:
        dfa = node.pattern.step(dfa, byte)
        if dfa < 0:
            return
    for (after,) in inner:  # one at most: the string's next frame
        out.add(rest + (("T", index, count, after[1:] + (("D",) if surrogate_next else ()), dfa),))


def _step_regex(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    """A value whose text matches a regex (integers in bounds; guided_regex at the top): it may
    end wherever the regex accepts, and the byte then belongs to what holds it."""
    _, index, dfa = frame
    regex = nodes[index].regex
    nxt = regex.step(dfa, byte)
    if nxt >= 0:
        out.add(rest + (("X", index, nxt),))
    if rest and regex.accepting(dfa):
        step(nodes, rest, byte, out)


def _step_number(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    integer, phase = frame[1], frame[2]
    nxt = None
    digit = byte in _DIGITS
    if phase in (0, 1):
        if byte == 0x2D and phase == 0:
            nxt = 1
        elif byte == 0x30:
            nxt = 2
        elif digit:
            nxt = 3
    elif phase in (2, 3):
        if digit and phase == 3:
            nxt = 3
        elif byte == 0x2E and not integer:
            nxt = 4
        elif byte in (0x65, 0x45) and not integer:
            nxt = 6
    elif phase in (4, 5):
        if digit:
            nxt = 5
        elif byte in (0x65, 0x45) and phase == 5:
            nxt = 6
    elif phase == 6:
        if byte in (0x2B, 0x2D):
            nxt = 7
        elif digit:
            nxt = 8
    elif phase in (7, 8) and digit:
        nxt = 8
    if nxt is not None:
        # Digits of a part: counted while the part goes on, and capped (a model that repeats a
        # digit would otherwise write one number until max_tokens).
        digits = frame[3] + 1 if nxt == phase and digit else int(digit)
        if digits <= (MAX_EXPONENT_DIGITS if nxt == 8 else MAX_NUMBER_DIGITS):
            out.add(rest + (("N", integer, nxt, digits),))
    if phase in _NUMBER_DONE and rest:
        # The number may end here: the byte belongs to what holds it.
        step(nodes, rest, byte, out)


def _took_whitespace(frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> bool:
    """Whitespace inside an object or array frame (kind, node, n, phase, ws): counted in the
    frame, MAX_WHITESPACE bytes in a row at most. True if `byte` was whitespace."""
    if byte not in _WS:
        return False
    if frame[4] < MAX_WHITESPACE:
        out.add(rest + (frame[:4] + (frame[4] + 1,),))
    return True


def _step_object(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    _, index, nxt, phase, _ = frame
    node = nodes[index]
    if _took_whitespace(frame, rest, byte, out):
        return
    if phase in ("first", "next"):
        if byte == 0x22:
            if node.properties:
                for j in _candidates(node, nxt):
                    key = node.properties[j][0]
                    out.add(rest + (("O", index, j, "key", 0), ("L", key, 1)))
            elif node.free_values is not None:
                out.add(rest + (("O", index, 0, "key", 0), ("S", 0)))
        elif byte == 0x7D and phase == "first" and _may_close(node, nxt):  # }
            out.add(rest)
    elif phase == "key":
        if byte == 0x3A:  # :
            out.add(rest + (("O", index, nxt, "colon", 0),))
    elif phase == "colon":
        value = node.properties[nxt][1] if node.properties else node.free_values
        after = nxt + 1 if node.properties else 0
        _start_value(nodes, value, rest + (("O", index, after, "value", 0),), byte, out)
    elif phase == "value":
        if byte == 0x2C and (_candidates(node, nxt) if node.properties else node.free_values is not None):  # ,
            out.add(rest + (("O", index, nxt, "next", 0),))
        elif byte == 0x7D and _may_close(node, nxt):
            out.add(rest)


def _candidates(node: Node, nxt: int) -> range:
    """Properties that may come next: from `nxt` up to the first required one (properties keep
    their declared order; optional ones may be skipped)."""
    end = len(node.properties)
    for j in range(nxt, end):
        if j in node.required:
            return range(nxt, j + 1)
    return range(nxt, end)


def _may_close(node: Node, nxt: int) -> bool:
    return not any(j >= nxt for j in node.required)


def _step_array(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    _, index, count, phase, _ = frame
    node = nodes[index]
    if _took_whitespace(frame, rest, byte, out):
        return
    if byte == 0x5D and phase != "next" and count >= node.min_items:  # ]
        out.add(rest)
        return
    if phase in ("first", "next"):
        if node.max_items is None or count < node.max_items:
            # The count matters only up to the limits: past them, one state (and one cached mask).
            bound = node.max_items if node.max_items is not None else node.min_items
            _start_value(nodes, node.items, rest + (("A", index, min(count + 1, bound), "value", 0),), byte, out)
    elif byte == 0x2C and (node.max_items is None or count < node.max_items):
        out.add(rest + (("A", index, count, "next", 0),))

