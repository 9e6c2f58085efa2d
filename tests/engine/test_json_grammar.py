"""The JSON-schema grammar (kiln_ray/engine/json_grammar.py) and its token masks
(kiln_ray/engine/guide.py), against references: Python's json module and the jsonschema
package judge every document, and a brute-force feed of every token judges every mask."""

import json
import random

import jsonschema
import pytest
import torch

from kiln_ray.engine.guide import Guide, GuideRuntime, GuideState, TokenVocabulary
from kiln_ray.engine.json_grammar import SchemaError, compile_schema, regex, sequence

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "days"],
}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["v", "kids"], "additionalProperties": False}},
    "$ref": "#/$defs/node",
}
MIXED = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "score": {"type": ["number", "null"]},
        "kind": {"anyOf": [{"const": "a"}, {"type": "integer"}, {"type": "object", "additionalProperties": {"type": "boolean"}}]},
    },
    "required": ["tags", "score", "kind"],
}
LIMITED = {  # value limits: patterns, lengths, integer bounds
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,4}$"},
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "age": {"type": "integer", "minimum": -3, "maximum": 140},
        "small": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 10}, "maxItems": 3},
        "word": {"type": "string", "pattern": "[bc]"},  # somewhere in the string
        "either": {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "integer", "minimum": 10}]},
    },
    "required": ["code", "name", "age", "small", "word", "either"],
}
ROOMS = {"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": 3},
                                             {"type": "string", "pattern": "^[a-c]+$", "maxLength": 6}]}}
SCHEMAS = [WEATHER, TREE, MIXED, LIMITED, {"type": "object"}, {}, {"type": "array", "items": {"type": "number"}}]


def accepts(schema, text: str) -> bool:
    grammar = compile_schema(schema)
    state = grammar.feed(grammar.start, text.encode())
    return bool(state) and grammar.complete(state)


@pytest.mark.parametrize("schema, text, valid", [
    (WEATHER, '{"city": "Paris", "days": 3}', True),
    (WEATHER, '{"city":"Paris","unit":"celsius","days":0,"hourly":false}', True),
    (WEATHER, '{\n  "city": "a\\"b\\u00e9",\n  "days": -12\n}', True),
    (WEATHER, '{"city": "Paris"}', False),  # a required key left out
    (WEATHER, '{"days": 3, "city": "Paris"}', False),  # keys in the declared order only
    (WEATHER, '{"city": "P", "unit": "kelvin", "days": 1}', False),  # not in the enum
    (WEATHER, '{"city": "P", "days": 1.5}', False),  # an integer
    (WEATHER, '{"city": "P", "days": 1,}', False),
    (WEATHER, '{"city": "P", "days": 1, "wind": 2}', False),  # not a property
    (WEATHER, '{"city": "P", "days": 01}', False),
    (WEATHER, ' {"city": "P", "days": 1}', False),  # nothing before the document
    (WEATHER, '{"city": "P", "days": 1} ', False),  # ... or after it
    (WEATHER, '{"city": "a\nb", "days": 1}', False),  # a raw control byte in a string
    (WEATHER, '{"city": "\\x", "days": 1}', False),  # not an escape
    (WEATHER, '{"city":' + " " * 33 + '"P", "days": 1}', False),  # past MAX_WHITESPACE
    (TREE, '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": []}]}', True),
    (TREE, '{"v": 1, "kids": [{"v": 2}]}', False),
    (MIXED, '{"tags": ["x"], "score": null, "kind": "a"}', True),
    (MIXED, '{"tags": ["x", "y", "z"], "score": 1e-3, "kind": {"p": true}}', True),
    (MIXED, '{"tags": [], "score": 1, "kind": 2}', False),  # minItems
    (MIXED, '{"tags": ["a", "b", "c", "d"], "score": 1, "kind": 2}', False),  # maxItems
    (MIXED, '{"tags": ["a"], "score": 1, "kind": "b"}', False),
    (MIXED, '{"tags": ["a"], "score": 1, "kind": {"p": 1}}', False),
    ({"type": "object", "additionalProperties": False}, "{}", True),
    ({"type": "object", "additionalProperties": False}, '{"a": 1}', False),
    ({}, '[1, -0.5, 2E+7, "s", true, null, {"k": [{}]}]', True),
    ({}, "1.", False),
    ({"type": "number"}, "-0", True),
    ({"const": {"a": [1, "x"]}}, '{"a": [1, "x"]}', True),
    ({"type": "string", "minLength": 2, "maxLength": 4}, '"é€😀"', True),  # code points, not bytes
    ({"type": "string", "minLength": 2, "maxLength": 4}, '"a\\nb"', True),  # an escape is one character
    ({"type": "string", "minLength": 2, "maxLength": 4}, '"a"', False),
    ({"type": "string", "minLength": 2, "maxLength": 4}, '"abcde"', False),
    ({"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}, '"bob@x.com"', True),
    ({"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}, '"bob@x.org"', False),
    ({"type": "string", "pattern": "\\d{3}"}, '"a123b"', True),  # a pattern matches anywhere
    ({"type": "string", "pattern": "\\d{3}"}, '"12a"', False),
    ({"type": "integer", "minimum": -5, "maximum": 120}, "-5", True),
    ({"type": "integer", "minimum": -5, "maximum": 120}, "120", True),
    ({"type": "integer", "minimum": -5, "maximum": 120}, "121", False),
    ({"type": "integer", "minimum": -5, "maximum": 120}, "-6", False),
    ({"type": "integer", "exclusiveMinimum": 0}, "12345678901234567890", True),
    ({"type": "integer", "exclusiveMinimum": 0}, "0", False),
    ({"type": "integer", "minimum": 0, "exclusiveMinimum": True}, "0", False),  # draft 4's flag
    ({"type": "integer", "minimum": 1.5, "maximum": 2.5}, "2", True),
    ({"type": "integer", "minimum": 1.5, "maximum": 2.5}, "1", False),
    ({"type": "string", "minLength": 2}, '"\\ud83d\\ude00"', False),  # one character in two escapes
    ({"type": "string", "minLength": 2}, '"\\ud7ff\\u0041"', True),
    ({"minimum": 0, "anyOf": [{"type": "integer", "minimum": -10}]}, "-5", False),  # both bounds hold
    ({"maxLength": 2, "anyOf": [{"type": "string", "maxLength": 5}]}, '"abcd"', False),
    ({"type": "integer", "minimum": 5, "anyOf": [{"maximum": 7}, {"maximum": 3}]}, "6", True),  # one alternative left
    ({"type": "integer", "minimum": 5, "anyOf": [{"maximum": 7}, {"maximum": 3}]}, "8", False),
    ({"minimum": 5}, "5.5", True),
    ({"type": "number"}, "-" + "9" * 20 + "." + "9" * 20 + "e+999", True),
    ({"type": "number"}, "0.30000000000000004", True),  # json.dumps(0.1 + 0.2)
    ({"type": "integer"}, "18446744073709551615", True),  # the largest uint64
    ({"type": "number"}, "1" * 21, False),  # digits are capped: a model repeating one digit must stop
    ({"type": "number"}, "0." + "1" * 21, False),
    ({"type": "number"}, "1e1000", False),
    ({"type": "integer", "minimum": -1e300, "maximum": 10**50}, "-" + "9" * 40, True),  # drawn in to 40 digits
    ({"type": "integer", "minimum": -1e300, "maximum": 10**50}, "1" + "0" * 40, False),  # stricter, never looser  # bounds of numbers are not enforced (an integer may still be any number)
    (LIMITED, '{"code": "AB-123", "name": "Zoë", "age": 140, "small": [9, -4], "word": "xcx", "either": 10}', True),
    (LIMITED, '{"code": "AB-12345", "name": "Zoë", "age": 1, "small": [], "word": "ab", "either": "x"}', False),
    (LIMITED, '{"code": "AB-12", "name": "Zoë", "age": 1, "small": [10], "word": "ab", "either": "x"}', False),
    (LIMITED, '{"code": "AB-12", "name": "Zoë", "age": 1, "small": [], "word": "ab", "either": 9}', False),
    (LIMITED, '{"code": "AB-12", "name": "Zoë", "age": 1, "small": [], "word": "xyz", "either": 9}', False),
])
def test_accepts_exactly_the_valid_documents(schema, text, valid):
    assert accepts(schema, text) is valid
    if valid:
        jsonschema.validate(json.loads(text), schema)  # the table itself agrees with the references


@pytest.mark.parametrize("schema", SCHEMAS, ids=["weather", "tree", "mixed", "limited", "object", "any", "numbers"])
def test_random_walks_through_the_grammar_are_valid_json_for_the_schema(schema):
    """Walk the automaton byte by byte, each byte drawn from those it allows: every document
    that completes parses and validates."""
    grammar = compile_schema(schema)
    alphabet = [b for b in range(0x20, 0x7F)] + [0x0A, 0xC3, 0xA9, 0xE6, 0x9D, 0xB1, 0xF0, 0x9F, 0x98, 0x80, 0xED, 0xA0]
    rng = random.Random(0)
    completed = 0
    for _ in range(200):
        state, out = grammar.start, bytearray()
        while len(out) < 3000:
            if grammar.complete(state) and (grammar.finished(state) or rng.random() < 0.3):
                break
            options = [b for b in alphabet if grammar.step(state, b)]
            assert options, f"a dead end after {bytes(out)!r}"
            # Lean towards bytes that close things, or strings and numbers never end.
            closing = [b for b in options if b in b'"]}0123456789,tfn']
            byte = rng.choice(closing if closing and rng.random() < 0.5 else options)
            out.append(byte)
            state = grammar.step(state, byte)
        if not grammar.complete(state):
            continue
        completed += 1
        jsonschema.validate(json.loads(out.decode("utf-8")), schema)  # strict: strings are valid UTF-8
    assert completed >= 100


@pytest.mark.parametrize("schema, error", [
    ({"type": "object", "allOf": [{}]}, "allOf"),
    ({"$ref": "https://example.com/s.json"}, "local"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"type": "strng"}, "unknown type"),
    ({"enum": []}, "1 to"),
    ({"enum": list(range(2000))}, "1 to"),
    ({"const": float("nan")}, "NaN"),
    ({"type": "string", "enum": [1, 2]}, "type"),
    ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {}}}, "beside"),
    ({"anyOf": [{}], "oneOf": [{}]}, "together"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems"),
    ([1], "must be an object"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"}, "back to itself"),
    ({"type": "object", "properties": {"a": {}}, "required": [["a"]]}, "required"),
    ({"type": "string", "pattern": "(?=a)b"}, "pattern"),
    ({"type": "string", "pattern": 3}, "pattern"),
    ({"type": "string", "minLength": 3, "maxLength": 1}, "maxLength"),
    ({"type": "integer", "minimum": 5, "maximum": 4.5}, "no integer"),
    ({"type": "integer", "maximum": "9"}, "number"),
    ({"type": "integer", "minimum": 10**309}, "digits"),
    ({"type": "integer", "maximum": -1e300}, "digits"),
    ({"type": "integer", "maximum": float("inf")}, "number"),
    ({"pattern": "^a", "anyOf": [{"type": "string", "pattern": "b$"}]}, "both beside"),
    ({"type": "integer", "minimum": 5, "anyOf": [{"maximum": 3}]}, "no alternative"),
])
def test_schemas_it_cannot_enforce_are_refused(schema, error):
    with pytest.raises(SchemaError, match=error):
        compile_schema(schema)


def test_a_sequence_is_one_of_its_prefixed_documents():
    grammar = sequence([(b"<call>f:", {"type": "integer"}, b"</call>"), (b"<call>g:", {"type": "boolean"}, b"</call>")])
    for text, valid in [("<call>f:12</call>", True), ("<call>g:true</call>", True), ("<call>g:12</call>", False),
                        ("<call>f:12", False), ("<call>h:1</call>", False)]:
        state = grammar.feed(grammar.start, text.encode())
        assert (bool(state) and grammar.complete(state)) is valid, text


@pytest.fixture(scope="module")
def smol_vocabulary(default_model_dir):
    from kiln_ray.model.registry import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    return tokenizer, TokenVocabulary.from_tokenizer(tokenizer, len(tokenizer))


def test_token_bytes_are_what_the_tokenizer_decodes(smol_vocabulary):
    tokenizer, vocabulary = smol_vocabulary
    text = '{"città": "Zürich 東京", "n": [1, 2]}\n'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(vocabulary.token_bytes[i] for i in ids) == text.encode()
    for special in tokenizer.all_special_ids:
        assert vocabulary.token_bytes[special] is None  # EOS and friends are never document text


@pytest.mark.parametrize("schema, prefix", [(WEATHER, p) for p in ['', '{', '{"', '{"ci', '{"city": ', '{"city": "Pa', '{"city": "Pa\\', '{"city": "P", ',
                                    '{"city": "P", "unit": "c', '{"city": "P", "days": 4', '{"city": "P", "days": 4}']] + [(LIMITED, p) for p in (
    '{"code": "', '{"code": "A', '{"code": "AB-12', '{"code": "AB-12", "name": "', '{"code": "AB-12", "name": "abcd',
    '{"code": "AB-12", "name": "ab', '{"code": "AB-12", "name": "ab", "age": ', '{"code": "AB-12", "name": "ab", "age": 14',
    '{"code": "AB-12", "name": "ab", "age": -', '{"code": "AB-12", "name": "ab", "age": 1, "small": [',
    '{"code": "AB-12", "name": "ab", "age": 1, "small": [], "word": "xa',
    '{"code": "AB-12", "name": "ab", "age": 1, "small": [], "word": "ab", "either": ')] + [(ROOMS, p) for p in (
    '["', '["a', '["ab', '["abc', '["abcab', '["abcabc', '["x', '["a", "')])
def test_masks_equal_a_brute_force_feed_of_every_token(smol_vocabulary, schema, prefix):
    _, vocabulary = smol_vocabulary
    grammar = compile_schema(schema)
    state = grammar.feed(grammar.start, prefix.encode())
    assert state
    expected = torch.tensor([b is not None and bool(grammar.feed(state, b)) for b in vocabulary.token_bytes])
    assert torch.equal(vocabulary.allowed(grammar, state), expected)


def _state(tokenizer, vocabulary, guide: Guide, text: str, stop_ids=frozenset({2})) -> GuideState:
    state = GuideState(guide, GuideRuntime(guide.grammar, vocabulary), stop_ids)
    for token in tokenizer.encode(text, add_special_tokens=False):
        state.advance(token)
    return state


def test_a_stop_guide_allows_only_stop_tokens_once_the_document_is_complete(smol_vocabulary):
    tokenizer, vocabulary = smol_vocabulary
    guide = Guide(compile_schema(WEATHER), after="stop")
    state = _state(tokenizer, vocabulary, guide, '{"city": "P", "days": 4')
    _, stops, allowed = state.mask()
    assert stops == [2] and not allowed  # "4" may go on, "}" may close: not complete yet
    state = _state(tokenizer, vocabulary, guide, '{"city": "P", "days": 4}')
    disallowed, stops, allowed = state.mask()
    assert stops == [2] and allowed and bool(disallowed.all())  # nothing but EOS (let through beside the mask)
    logits = torch.zeros(1, vocabulary.size)
    logits[0, 2] = float("-inf")  # as min_tokens leaves it
    from kiln_ray.engine.guide import apply_guides

    apply_guides(logits, [state])
    assert logits[0].argmax().item() == 2 and torch.isfinite(logits[0, 2])  # a complete document may stop


def test_a_triggered_guide_is_free_until_the_trigger_then_holds_the_call_then_frees_it(smol_vocabulary):
    tokenizer, vocabulary = smol_vocabulary
    opening = b'<tool_call>\n{"name": "get_weather", "arguments": '
    guide = Guide(sequence([(opening, WEATHER, b"}\n</tool_call>")]), after="free", trigger=b"<tool_call>")
    state = _state(tokenizer, vocabulary, guide, "Let me check the weather. ")
    assert state.mask() is None  # free text
    state = _state(tokenizer, vocabulary, guide, "Let me check. <tool_call>\n")
    disallowed, _, _ = state.mask()
    wrong = tokenizer.encode("Sure", add_special_tokens=False)[0]
    right = tokenizer.encode("{", add_special_tokens=False)[0]
    assert bool(disallowed[wrong]) and not bool(disallowed[right])
    state = _state(tokenizer, vocabulary, guide,
                   'x <tool_call>\n{"name": "get_weather", "arguments": {"city": "P", "days": 2}}\n</tool_call>')
    assert state.mask() is None  # the call is complete: free again (another may open)


def test_a_forced_opening_starts_the_guide_constrained(smol_vocabulary):
    tokenizer, vocabulary = smol_vocabulary
    opening = b'<tool_call>\n{"name": "get_weather", "arguments": '
    guide = Guide(sequence([(opening, WEATHER, b"}\n</tool_call>")]), after="free",
                  consumed=b'<tool_call>\n{"name": "', trigger=b"<tool_call>")
    state = _state(tokenizer, vocabulary, guide, "")
    disallowed, _, _ = state.mask()
    allowed = {tokenizer.decode([int(i)]) for i in (~disallowed).nonzero().flatten()}
    assert allowed and all("get_weather".startswith(a) for a in allowed), allowed


def test_a_ref_chain_longer_than_the_recursion_limit_compiles_and_steps():
    """$refs chained 5000 deep (each short, so the compiler's depth limit is not the guard)
    are flattened at compile time: starting a value is one loop, not 5000 calls."""
    n = 5000
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "integer"}
    properties = {f"p{k}": {"$ref": f"#/$defs/a{n - 30 * (k + 1)}"} for k in range(n // 30)}
    properties["last"] = {"$ref": "#/$defs/a0"}
    schema = {"$defs": defs, "type": "object", "properties": properties, "required": ["last"]}
    assert accepts(schema, '{"last": 7}')
    assert not accepts(schema, '{"last": "x"}')


def test_undecided_alternatives_that_multiply_overflow_instead_of_stalling():
    from kiln_ray.engine.json_grammar import GrammarOverflow

    twins = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}},
                                       {"type": "array", "items": {"$ref": "#/$defs/x"}}]}}, "$ref": "#/$defs/x"}
    grammar = compile_schema(twins)
    with pytest.raises(GrammarOverflow):
        grammar.feed(grammar.start, b"[" * 20)


def test_an_overflowing_guide_lets_the_sequence_go_on_free(smol_vocabulary):
    tokenizer, vocabulary = smol_vocabulary
    twins = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}},
                                       {"type": "array", "items": {"$ref": "#/$defs/x"}}]}}, "$ref": "#/$defs/x"}
    state = _state(tokenizer, vocabulary, Guide(compile_schema(twins)), "[" * 20)
    assert not state.constrained and state.mask() is None


def test_array_lengths_past_their_limits_share_one_state():
    grammar = compile_schema({"type": "array", "items": {"type": "integer"}})
    states = {grammar.feed(grammar.start, ("[" + ", ".join(["1"] * k) + ", ").encode()) for k in range(1, 40)}
    assert len(states) == 1  # one cached mask for the whole array, not one per item


def test_property_order_is_part_of_the_grammar_key():
    xy = compile_schema({"type": "object", "properties": {"x": {}, "y": {}}, "required": ["x", "y"]})
    yx = compile_schema({"type": "object", "properties": {"y": {}, "x": {}}, "required": ["y", "x"]})
    assert xy.key != yx.key


def test_constraints_beside_any_of_apply_to_every_alternative():
    schema = {"type": "integer", "anyOf": [{"enum": [1, 2]}, {"type": "integer"}]}
    assert accepts(schema, "5") and not accepts(schema, '"5"')
    assert accepts({"type": "string", "enum": ["a", 1]}, '"a"') and not accepts({"type": "string", "enum": ["a", 1]}, "1")


@pytest.mark.parametrize("data, valid", [
    ('"Zürich 東京 😀"'.encode(), True),
    (b'"\xc3"', False),  # a lead byte without its continuation
    (b'"\xc0\xaf"', False),  # overlong
    (b'"\xed\xa0\x80"', False),  # a surrogate
    (b'"\xf4\x90\x80\x80"', False),  # past U+10FFFF
    (b'"\xff"', False),
])
def test_strings_are_valid_utf8(data, valid):
    grammar = compile_schema({"type": "string"})
    state = grammar.feed(grammar.start, data)
    assert (bool(state) and grammar.complete(state)) is valid


def test_a_regex_grammar_reads_exactly_the_texts_the_regex_matches_whole(smol_vocabulary):
    _, vocabulary = smol_vocabulary
    grammar = regex(r"(yes|no), \d{1,2}")
    for text, valid in [("yes, 7", True), ("no, 42", True), ("no, 420", False), ("maybe, 1", False), ("yes,7", False)]:
        state = grammar.feed(grammar.start, text.encode())
        assert (bool(state) and grammar.complete(state)) is valid, text
    assert grammar.finished(grammar.feed(grammar.start, b"no, 42"))  # nothing may follow: only EOS
    assert not grammar.finished(grammar.feed(grammar.start, b"no, 4"))
    for prefix in ("", "ye", "yes, ", "no, 4"):
        state = grammar.feed(grammar.start, prefix.encode())
        expected = torch.tensor([b is not None and bool(grammar.feed(state, b)) for b in vocabulary.token_bytes])
        assert torch.equal(vocabulary.allowed(grammar, state), expected), prefix


@pytest.mark.parametrize("schema, text, finished", [
    ({"type": "integer"}, "0", True), ({"type": "integer"}, "-0", True), ({"type": "integer"}, "1" * 20, True),
    ({"type": "integer"}, "12", False), ({"type": "number"}, "0", False), ({"type": "number"}, "1e123", True),
    ({"type": "number"}, "1" * 20, False),  # a point or an exponent may still come
])
def test_a_top_level_number_that_cannot_go_on_is_finished(schema, text, finished):
    """With ignore_eos nothing can stop such a document: the guide then leaves it to max_tokens
    instead of masking every token."""
    grammar = compile_schema(schema)
    state = grammar.feed(grammar.start, text.encode())
    assert grammar.complete(state) and grammar.finished(state) is finished
