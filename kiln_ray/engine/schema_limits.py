"""JSON Schema value limits for kiln_ray/engine/json_grammar.py: string lengths and patterns,
integer bounds, and how limits beside an anyOf meet those of its alternatives."""

from __future__ import annotations

import math
from typing import Any, Callable

from kiln_ray.engine.json_automaton import Node
from kiln_ray.engine.regex_dfa import MAX_INTEGER_DIGITS, Regex, RegexBudget, RegexError, compile_regex, integer_range

# Integers written under bounds have at most this many digits: a bound past it is drawn in to
# it (stricter than the schema, never looser), and one wholly past it is a SchemaError.
LARGEST = 10**MAX_INTEGER_DIGITS - 1
# Value limits: enforced on strings and integers; not on numbers, nor beside enum, const or $ref.
NUMBER_LIMITS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
LIMITS = {"minLength", "maxLength", "pattern", *NUMBER_LIMITS}


class SchemaError(ValueError):
    """The schema cannot be enforced (malformed, or uses a keyword outside the subset)."""


class Unsatisfiable(SchemaError):
    """No value fits (bounds or types that do not meet): an anyOf alternative is left out."""


def count(schema: dict, key: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not default and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SchemaError(f"{key} must be a non-negative integer")
    return value


def string_limits(node: Node, schema: dict, budget: RegexBudget) -> None:
    node.min_length = count(schema, "minLength", 0)
    node.max_length = count(schema, "maxLength", None)
    if node.max_length is not None and node.max_length < node.min_length:
        raise Unsatisfiable("maxLength is below minLength")
    if "pattern" in schema:
        node.pattern = compiled_regex(_searching(schema["pattern"]), budget, json_string=True)


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


def integer_texts(schema: dict, budget: RegexBudget) -> Regex:
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
        raise Unsatisfiable("no integer lies between the schema's minimum and maximum")
    if (low is not None and low > LARGEST) or (high is not None and high < -LARGEST):
        raise SchemaError(f"minimum / maximum: integers of more than {MAX_INTEGER_DIGITS} digits are not supported")
    low = max(low, -LARGEST) if low is not None else None
    high = min(high, LARGEST) if high is not None else None
    return compiled_regex(lambda: integer_range(low, high), budget, what="minimum / maximum")


def _bound(schema: dict, key: str) -> float | int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise SchemaError(f"{key} must be a number")
    return value


def compiled_regex(pattern: str | Callable[[], str], budget: RegexBudget | None, json_string: bool = False,
                   what: str = "pattern") -> Regex:
    """compile_regex, its RegexError a SchemaError naming `what`; `pattern` may be a callable
    that builds the source (integer_range raises RegexError too). `budget`: shared by every
    pattern of one request, so many of them cannot add up to minutes of compiling."""
    try:
        return compile_regex(pattern() if callable(pattern) else pattern, json_string=json_string, budget=budget)
    except RegexError as error:
        raise SchemaError(f"{what}: {error}") from None


_TIGHTER = {"minLength": max, "minimum": max, "exclusiveMinimum": max, "minItems": max,
            "maxLength": min, "maximum": min, "exclusiveMaximum": min, "maxItems": min}


def merged(beside: dict, alternative: dict) -> dict:
    """An anyOf alternative with the constraints beside the anyOf: both hold, so bounds take
    the tighter of the two and types their intersection; other keywords given in both must
    agree (no general intersection of schemas here)."""
    merged = {**beside, **alternative}
    for key in beside.keys() & alternative.keys():
        ours, theirs = beside[key], alternative[key]
        if ours == theirs:
            continue
        if key in _TIGHTER and not isinstance(ours, bool) and not isinstance(theirs, bool):
            merged[key] = _TIGHTER[key](ours, theirs)
        elif key == "type":
            types = set(ours if isinstance(ours, list) else [ours]) & set(theirs if isinstance(theirs, list) else [theirs])
            if not types:
                raise Unsatisfiable("the types beside anyOf and in an alternative do not meet")
            merged[key] = sorted(types)
        else:
            raise SchemaError(f"{key} both beside anyOf / oneOf and in an alternative, with different values, "
                              "is not supported")
    return merged
