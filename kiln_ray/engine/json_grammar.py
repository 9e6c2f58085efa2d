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
from dataclasses import dataclass, field
from typing import Any

from kiln_ray.engine.json_automaton import (  # noqa: F401 - MAX_* re-exported
    MAX_DEPTH, MAX_WHITESPACE, TYPES, UNBOUNDED, Node, Stack, State, finishes, at_an_end, step,
)
from kiln_ray.engine.regex_dfa import Regex, RegexBudget
from kiln_ray.engine.schema_limits import (  # noqa: F401 - the errors re-exported
    LIMITS, NUMBER_LIMITS, SchemaError, Unsatisfiable, compiled_regex, count, integer_texts, merged, string_limits,
)

# Bounds on what one request can make the engine's step thread do (a schema arrives from a client):
MAX_NODES = 4096  # subschemas in one grammar
MAX_CHOICES = 1024  # enum values, properties or anyOf alternatives of one subschema
MAX_ALTERNATIVES = 256  # alternatives one parse state may hold; past it, GrammarOverflow

_IGNORED = {
    "title", "description", "default", "examples", "example", "format", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "multipleOf", "strict", "name", "nullable", "discriminator",
}
_KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
          "anyOf", "oneOf", "$ref", "$defs", "definitions"}


class GrammarOverflow(RuntimeError):
    """A parse state grew past MAX_ALTERNATIVES (anyOf alternatives that stay undecided, nested);
    the guide gives up on the request rather than slow the engine down."""


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
                step(self.nodes, stack, byte, out)
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
        return any(not stack or finishes(self.nodes, stack) for stack in state)

    def finished(self, state: State) -> bool:
        """Every alternative has read a whole document: no byte can follow."""
        return bool(state) and all(not stack or at_an_end(self.nodes, stack) for stack in state)

    def plain_text_runs(self, state: State) -> set[tuple[Regex | None, int, int]] | None:
        """Where every alternative is between two characters of a string (not an enum), text
        without `"`, `\\` or control bytes is read whole, so guide.py can allow such tokens
        wholesale: per alternative, (the string's pattern or None, its DFA state, characters it
        may still take). None: not such a state."""
        runs = set()
        for stack in state:
            frame = stack[-1] if stack else ("",)
            if frame[0] == "S" and frame[1] == 0:
                runs.add((None, -1, UNBOUNDED))
            elif frame[0] == "T" and frame[3] == (0,):
                node = self.nodes[frame[1]]
                room = UNBOUNDED if node.max_length is None else node.max_length - frame[2]
                runs.add((node.pattern, frame[4], room))
            else:
                return None
        return runs


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
    node = Node(regex=compiled_regex(pattern, None))
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
        self.budget = RegexBudget()  # every pattern and integer bound of the grammar, together

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
        unknown = sorted(k for k in schema if k not in _KNOWN and k not in _IGNORED and k not in LIMITS)
        if unknown:
            raise SchemaError(f"unsupported schema keyword(s): {', '.join(unknown)}")
        constraining = {k for k in schema if k not in _IGNORED and k not in LIMITS and k not in ("$defs", "definitions")}
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
            beside = {k: schema[k] for k in (constraining | (LIMITS & schema.keys())) - {"anyOf", "oneOf"}}
            node.any_of = tuple(self._alternatives(beside, alternatives, depth))
            return index
        node.types = self._types(schema)
        if "string" in node.types:
            string_limits(node, schema, self.budget)
        if "integer" in node.types and "number" not in node.types and NUMBER_LIMITS & schema.keys():
            node.regex = integer_texts(schema, self.budget)
        if "object" in node.types:
            self._object(node, schema, depth)
        if "array" in node.types:
            node.items = self.compile(schema.get("items"), depth + 1)
            node.min_items = count(schema, "minItems", 0)
            node.max_items = count(schema, "maxItems", None)
            if node.max_items is not None and node.max_items < node.min_items:
                raise SchemaError("maxItems is below minItems")
        return index

    def _alternatives(self, beside: dict, alternatives: list, depth: int) -> list[int]:
        """Compiled alternatives, each with the constraints beside them; one that no value can
        satisfy then (types or bounds that do not meet) is left out, not the whole schema."""
        compiled = []
        for alternative in alternatives:
            try:
                schema = merged(beside, alternative) if beside and isinstance(alternative, dict) else alternative
                compiled.append(self.compile(schema, depth + 1))
            except Unsatisfiable:
                continue
        if not compiled:
            raise SchemaError("no alternative of anyOf / oneOf can be satisfied")
        return compiled

    def _types(self, schema: dict) -> frozenset[str]:
        declared = schema.get("type")
        if declared is None:
            return frozenset(TYPES)
        names = declared if isinstance(declared, list) else [declared]
        if not names or any(n not in TYPES for n in names):
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


def _literal(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), allow_nan=False).encode()
    except ValueError:
        raise SchemaError("NaN and Infinity are not JSON") from None


