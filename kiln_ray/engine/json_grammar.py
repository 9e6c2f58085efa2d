"""JSON constrained by a JSON Schema, as a byte-level automaton: which bytes may come next.

`compile_schema` turns a schema (the subset below) into a `Grammar`: a table of nodes. A parse
position is a `State`, a frozenset of alternatives; each alternative is a stack of frames
(tuples), the innermost last. `Grammar.step(state, byte)` is the state after one more byte,
empty when the byte cannot continue any alternative; an alternative whose stack is empty has
read a complete document. Alternatives are how anyOf, optional object keys, enum values and
"is this number finished?" stay undecided until a byte decides them.

Enforced: type (one or a list), properties (in the order declared; `required` ones must
appear, the others may be left out), additionalProperties (a free-form object when there are no
properties), items, minItems / maxItems, enum, const, anyOf / oneOf, $ref into $defs /
definitions (recursion allowed). Strings are any JSON string of valid UTF-8, held to minLength /
maxLength (code points; an escape is one) and `pattern` (kiln_ray/engine/regex_dfa.py: a string
with a pattern is written without escapes, so it holds no `"`, `\\` or control characters).
Integers follow minimum / maximum / exclusiveMinimum / exclusiveMaximum; numbers follow JSON's
grammar, their bounds are not enforced, nor are value limits beside enum, const or $ref.
Annotations (title, description, default, examples, format, ...) are ignored.

Whitespace: none at the top level; up to MAX_WHITESPACE bytes of space, tab or newline where
JSON allows it inside objects and arrays, so a model may indent but not pad forever.

No torch here; kiln_ray/engine/guide.py turns states into token masks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from kiln_ray.engine.regex_dfa import Regex, RegexError, compile_regex, integer_range

MAX_WHITESPACE = 32
MAX_DEPTH = 64  # nesting of objects and arrays in one document
# Bounds on what one request can make the engine's step thread do (a schema arrives from a client):
MAX_NODES = 4096  # subschemas in one grammar
MAX_CHOICES = 1024  # enum values, properties or anyOf alternatives of one subschema
MAX_ALTERNATIVES = 256  # alternatives one parse state may hold; past it, GrammarOverflow
UNBOUNDED = 1 << 30  # room of a string without maxLength

Frame = tuple
Stack = tuple[Frame, ...]
State = frozenset  # of Stack

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_IGNORED = {
    "title", "description", "default", "examples", "example", "format", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "multipleOf", "strict", "name", "nullable", "discriminator",
}
# Value limits: enforced on strings and integers; not on numbers, nor beside enum, const or $ref.
_NUMBER_LIMITS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_LIMITS = {"minLength", "maxLength", "pattern", *_NUMBER_LIMITS}
_KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
          "anyOf", "oneOf", "$ref", "$defs", "definitions"}
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


class SchemaError(ValueError):
    """The schema cannot be enforced (malformed, or uses a keyword outside the subset)."""


class GrammarOverflow(RuntimeError):
    """A parse state grew past MAX_ALTERNATIVES (anyOf alternatives that stay undecided, nested);
    the guide gives up on the request rather than slow the engine down."""


@dataclass
class Node:
    types: frozenset[str] = frozenset(_TYPES)
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


@dataclass
class Grammar:
    """Compiled schema; node 0 accepts any JSON value. `start` is the state before the first
    byte (see `sequence` for text around the document). Picklable plain data."""

    nodes: list[Node]
    start: State
    key: str  # identifies the grammar (equal keys, equal grammars)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self):
        return {"nodes": self.nodes, "start": self.start, "key": self.key}

    def __setstate__(self, data):
        self.nodes, self.start, self.key = data["nodes"], data["start"], data["key"]
        self._memo = {}

    def step(self, state: State, byte: int) -> State:
        memo_key = (state, byte)
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        out: set[Stack] = set()
        for stack in state:
            if stack:
                _step(self.nodes, stack, byte, out)
        if len(out) > MAX_ALTERNATIVES:
            raise GrammarOverflow(f"a parse state of more than {MAX_ALTERNATIVES} alternatives")
        result = frozenset(out)
        if len(self._memo) > 50_000:
            self._memo.clear()
        self._memo[memo_key] = result
        return result

    def feed(self, state: State, data: bytes) -> State:
        for byte in data:
            if not state:
                return state
            state = self.step(state, byte)
        return state

    def complete(self, state: State) -> bool:
        """Some alternative has read a whole document (a number may still go on, too)."""
        return any(not stack or _finishes(self.nodes, stack) for stack in state)

    def finished(self, state: State) -> bool:
        """Every alternative has read a whole document: no byte can follow."""
        return bool(state) and all(not stack or _regex_ends(self.nodes, stack) for stack in state)

    def free_string_room(self, state: State) -> int | None:
        """Characters any plain text may add here: every alternative is between two characters of
        a string without a pattern (not an enum), where text without `"`, `\\` or control bytes
        is read whole up to maxLength (guide.py's shortcut). None: not such a state."""
        room = None
        for stack in state:
            frame = stack[-1] if stack else ("",)
            if frame[0] == "S" and frame[1] == 0:
                here = UNBOUNDED
            elif frame[0] == "T" and frame[3] == (0,) and self.nodes[frame[1]].pattern is None:
                limit = self.nodes[frame[1]].max_length
                here = UNBOUNDED if limit is None else limit - frame[2]
            else:
                return None
            if room is not None and here != room:
                return None
            room = here
        return room


def compile_schema(schema: Any, prefix: bytes = b"", suffix: bytes = b"") -> Grammar:
    """A grammar for `prefix` + one JSON document valid for `schema` + `suffix` (literal bytes).
    `schema` None or {} (or True) accepts any JSON value; raises SchemaError."""
    return sequence([(prefix, schema, suffix)])


def sequence(choices: list[tuple[bytes, Any, bytes]]) -> Grammar:
    """A grammar for one of several `prefix + document + suffix` texts, e.g. one tool call out
    of several, each `<tool_call>{"name": NAME, "arguments": ` + its parameters' schema + `}...`."""
    compiler = _Compiler()
    starts: set[Stack] = set()
    for prefix, schema, suffix in choices:
        root = compiler.compile_root(schema)
        stack: Stack = ()
        if suffix:
            stack += (("L", suffix, 0),)
        stack += (("V", root),)
        if prefix:
            stack += (("L", prefix, 0),)
        starts.add(stack)
    _flatten_alternatives(compiler.nodes)
    # Not sort_keys: property order is part of the grammar.
    key = json.dumps([[p.decode("latin-1"), s, x.decode("latin-1")] for p, s, x in choices])
    return Grammar(compiler.nodes, frozenset(starts), key)


def regex(pattern: str) -> Grammar:
    """A grammar for exactly the texts `pattern` matches whole (vLLM's guided_regex)."""
    node = Node(regex=_compiled_regex(pattern))
    return Grammar([Node(), node], frozenset({(("X", 1, node.regex.start),)}), json.dumps(["regex", pattern]))


def choice(texts: list[str]) -> Grammar:
    """A grammar for exactly one of `texts` (vLLM's guided_choice: a label, not JSON)."""
    if not texts or len(texts) > MAX_CHOICES:
        raise SchemaError(f"a choice needs 1 to {MAX_CHOICES} strings")
    starts = frozenset((("L", t.encode(), 0),) if t else () for t in texts)
    return Grammar([Node()], starts, json.dumps(["choice", texts]))


class _Compiler:
    def __init__(self):
        self.nodes: list[Node] = [Node(free_values=0, items=0)]  # node 0: any value
        self.root: Any = None
        self.refs: dict[str, int] = {}

    def compile_root(self, schema: Any) -> int:
        self.root = schema
        self.refs = {}
        return self.compile(schema, 0)

    def compile(self, schema: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels")
        if schema is None or schema is True or schema == {}:
            return 0
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object, not {type(schema).__name__}")
        unknown = sorted(k for k in schema if k not in _KNOWN and k not in _IGNORED and k not in _LIMITS)
        if unknown:
            raise SchemaError(f"unsupported schema keyword(s): {', '.join(unknown)}")
        constraining = {k for k in schema if k not in _IGNORED and k not in _LIMITS and k not in ("$defs", "definitions")}
        if "$ref" in schema:
            if constraining != {"$ref"}:
                raise SchemaError(f"$ref beside {', '.join(sorted(constraining - {'$ref'}))} is not supported")
            return self._ref(schema["$ref"], depth)
        if len(self.nodes) >= MAX_NODES:
            raise SchemaError(f"the schema has more than {MAX_NODES} subschemas")
        node = Node()
        index = len(self.nodes)
        self.nodes.append(node)
        if "const" in schema or "enum" in schema:
            if constraining - {"const", "enum", "type"} or {"const", "enum"} <= constraining:
                raise SchemaError("enum / const beside other constraints is not supported")
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
                raise SchemaError(f"enum must be an array of 1 to {MAX_CHOICES} values")
            if "type" in schema:
                types = self._types(schema)
                values = [v for v in values if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)]
                if not values:
                    raise SchemaError("no enum value has the schema's type")
            node.literals = tuple(_literal(v) for v in values)
            return index
        if "anyOf" in schema and "oneOf" in schema:
            raise SchemaError("anyOf and oneOf together are not supported")
        alternatives = schema.get("anyOf", schema.get("oneOf"))
        if alternatives is not None:
            if not isinstance(alternatives, list) or not alternatives or len(alternatives) > MAX_CHOICES:
                raise SchemaError(f"anyOf / oneOf must be an array of 1 to {MAX_CHOICES} schemas")
            # Constraints beside anyOf apply to every alternative (oneOf is enforced as anyOf).
            beside = {k: schema[k] for k in (constraining | (_LIMITS & schema.keys())) - {"anyOf", "oneOf"}}
            if beside:
                alternatives = [{**beside, **a} if isinstance(a, dict) else a for a in alternatives]
            node.any_of = tuple(self.compile(s, depth + 1) for s in alternatives)
            return index
        node.types = self._types(schema)
        if "string" in node.types:
            _string_limits(node, schema)
        if "integer" in node.types and _NUMBER_LIMITS & schema.keys():
            node.regex = _integer_texts(schema)
        if "object" in node.types:
            self._object(node, schema, depth)
        if "array" in node.types:
            node.items = self.compile(schema.get("items"), depth + 1)
            node.min_items = _count(schema, "minItems", 0)
            node.max_items = _count(schema, "maxItems", None)
            if node.max_items is not None and node.max_items < node.min_items:
                raise SchemaError("maxItems is below minItems")
        return index

    def _types(self, schema: dict) -> frozenset[str]:
        declared = schema.get("type")
        if declared is None:
            return frozenset(_TYPES)
        names = declared if isinstance(declared, list) else [declared]
        if not names or any(n not in _TYPES for n in names):
            raise SchemaError(f"unknown type {declared!r}")
        types = set(names)
        if "number" in types:
            types.discard("integer")
        return frozenset(types)

    def _object(self, node: Node, schema: dict, depth: int) -> None:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise SchemaError("properties must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or any(not isinstance(r, str) or r not in properties for r in required):
            raise SchemaError("required names a property that is not in properties")
        names = list(properties)
        if len(names) > MAX_CHOICES:
            raise SchemaError(f"an object schema may have at most {MAX_CHOICES} properties")
        node.properties = tuple((_literal(k), self.compile(properties[k], depth + 1)) for k in names)
        node.required = frozenset(names.index(r) for r in required)
        extra = schema.get("additionalProperties", True)
        if not names and extra is not False:
            node.free_values = 0 if extra is True else self.compile(extra, depth + 1)

    def _ref(self, ref: Any, depth: int) -> int:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"only local $refs (#/$defs/...) are supported, not {ref!r}")
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"$ref {ref!r} points at nothing")
            target = target[part]
        # Registered before it is compiled, so a recursive schema refers back to itself.
        placeholder = len(self.nodes)
        self.nodes.append(Node())
        self.refs[ref] = placeholder
        self.nodes[placeholder] = Node(any_of=(self.compile(target, depth + 1),))
        return placeholder


def _flatten_alternatives(nodes: list[Node]) -> None:
    """Make every anyOf node (anyOf, oneOf, $ref) list the plain nodes it stands for, so a
    value starts with one loop, however long a chain of $refs was. Iterative: a chain can be
    longer than Python's recursion limit. A $ref leading back to itself through anyOf / $ref
    alone (no object or array in between) would expand forever: a SchemaError."""
    leaves: dict[int, tuple[int, ...]] = {}
    for root in range(len(nodes)):
        if not nodes[root].any_of or root in leaves:
            continue
        stack, on_path = [(root, 0)], {root}
        while stack:
            index, i = stack[-1]
            children = nodes[index].any_of
            if i < len(children):
                stack[-1] = (index, i + 1)
                child = children[i]
                if not nodes[child].any_of or child in leaves:
                    continue
                if child in on_path:
                    raise SchemaError("a $ref leads back to itself without an object or array in between")
                on_path.add(child)
                stack.append((child, 0))
                continue
            stack.pop()
            on_path.discard(index)
            flat = dict.fromkeys(leaf for c in children for leaf in (leaves[c] if nodes[c].any_of else (c,)))
            if len(flat) > MAX_CHOICES:
                raise SchemaError(f"a subschema stands for more than {MAX_CHOICES} alternatives")
            leaves[index] = tuple(flat)
    for index, flat in leaves.items():
        nodes[index].any_of = flat


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "?")


def _count(schema: dict, key: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not default and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SchemaError(f"{key} must be a non-negative integer")
    return value


def _string_limits(node: Node, schema: dict) -> None:
    node.min_length = _count(schema, "minLength", 0)
    node.max_length = _count(schema, "maxLength", None)
    if node.max_length is not None and node.max_length < node.min_length:
        raise SchemaError("maxLength is below minLength")
    if "pattern" in schema:
        node.pattern = _compiled_regex(_searching(schema["pattern"]), json_string=True)


def _searching(pattern: Any) -> str:
    """A JSON Schema pattern matches anywhere in the string; compile_regex matches whole texts.
    Anchors are dropped and their absence becomes `.*`. Where an anchor binds less than the
    whole pattern (`^a|b$`) the result is stricter than the schema, never looser: every string
    written still matches."""
    if not isinstance(pattern, str):
        raise SchemaError("pattern must be a string")
    body, start, end = pattern, ".*", ".*"
    if body.startswith("^"):
        body, start = body[1:], ""
    if body.endswith("$") and (len(body[:-1]) - len(body[:-1].rstrip("\\"))) % 2 == 0:  # not an escaped \$
        body, end = body[:-1], ""
    return f"{start}(?:{body}){end}"


def _integer_texts(schema: dict) -> Regex:
    """The integers in [minimum, maximum] (exclusive forms too, draft 4's boolean ones included)."""
    low, high = _bound(schema, "minimum"), _bound(schema, "maximum")
    low = math.ceil(low) if low is not None else None
    high = math.floor(high) if high is not None else None
    exclusive_low, exclusive_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(exclusive_low, bool):  # draft 4: a flag on minimum
        if exclusive_low and low is not None and low == schema["minimum"]:
            low += 1
    elif exclusive_low is not None:
        above = math.floor(_bound(schema, "exclusiveMinimum")) + 1
        low = above if low is None else max(low, above)
    if isinstance(exclusive_high, bool):
        if exclusive_high and high is not None and high == schema["maximum"]:
            high -= 1
    elif exclusive_high is not None:
        below = math.ceil(_bound(schema, "exclusiveMaximum")) - 1
        high = below if high is None else min(high, below)
    if low is not None and high is not None and low > high:
        raise SchemaError("no integer lies between the schema's minimum and maximum")
    return _compiled_regex(lambda: integer_range(low, high))


def _bound(schema: dict, key: str) -> float | int | None:
    value = schema.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise SchemaError(f"{key} must be a number")
    return value


def _compiled_regex(pattern, json_string: bool = False) -> Regex:
    try:
        return compile_regex(pattern() if callable(pattern) else pattern, json_string=json_string)
    except RegexError as error:
        raise SchemaError(f"pattern: {error}") from None


def _literal(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), allow_nan=False).encode()
    except ValueError:
        raise SchemaError("NaN and Infinity are not JSON") from None


# -- the automaton ---------------------------------------------------------------------------
# Frames:
#   ("V", node)                        a value of `node` starts with the next byte
#   ("L", text, pos)                   the literal `text`, `pos` bytes of it read
#   ("S", mode)                        inside a string: 0 plain, 1 after a backslash, 2-5 \u digits left + 1
#   ("S", 6, left, lo, hi)             inside a string, within a UTF-8 sequence (only valid UTF-8 is written)
#   ("N", integer, phase)              a number (phases below)
#   ("O", node, next, phase, ws)       an object; `next`: index of the next candidate property
#   ("A", node, count, phase, ws)      an array of `count` items so far
# Number phases: 0 start, 1 after "-", 2 after a leading 0, 3 integer digits, 4 after ".",
# 5 fraction digits, 6 after e/E, 7 after the exponent sign, 8 exponent digits.
_NUMBER_DONE = frozenset({2, 3, 5, 8})


def _finishes(nodes: list[Node], stack: Stack) -> bool:
    """Whether the stack is a finished-if-nothing-follows number (or regex text) and nothing else."""
    if len(stack) != 1:
        return False
    frame = stack[0]
    if frame[0] == "N":
        return frame[2] in _NUMBER_DONE
    return frame[0] == "X" and nodes[frame[1]].regex.accepting(frame[2])


def _step(nodes: list[Node], stack: Stack, byte: int, out: set[Stack]) -> None:
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
        _step_number(nodes, ("N", "number" not in types, 0), rest, byte, out)


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


def _regex_ends(nodes: list[Node], stack: Stack) -> bool:
    """The stack is only regex text (guided_regex) that has matched and cannot go on."""
    return len(stack) == 1 and stack[0][0] == "X" and nodes[stack[0][1]].regex.finished(stack[0][2])


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
    inner: set[Stack] = set()
    _step_string(("S",) + sub, (), byte, inner)
    if node.pattern is not None:
        dfa = node.pattern.step(dfa, byte)
        if dfa < 0:
            return
    for (after,) in inner:  # one at most: the string's next frame
        out.add(rest + (("T", index, count, after[1:], dfa),))


def _step_regex(nodes: list[Node], frame: Frame, rest: Stack, byte: int, out: set[Stack]) -> None:
    """A value whose text matches a regex (integers in bounds; guided_regex at the top): it may
    end wherever the regex accepts, and the byte then belongs to what holds it."""
    _, index, dfa = frame
    regex = nodes[index].regex
    nxt = regex.step(dfa, byte)
    if nxt >= 0:
        out.add(rest + (("X", index, nxt),))
    if rest and regex.accepting(dfa):
        _step(nodes, rest, byte, out)


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
        out.add(rest + (("N", integer, nxt),))
    if phase in _NUMBER_DONE and rest:
        # The number may end here: the byte belongs to what holds it.
        _step(nodes, rest, byte, out)


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
