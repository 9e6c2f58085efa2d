"""Structured output: the guides (kiln_ray/engine/guide.py) a request's fields ask for.

- `response_format` json_object: the reply is one JSON object; json_schema: one JSON document
  valid for the schema (the subset kiln_ray/engine/json_grammar.py enforces). Then EOS.
- tools: once the reply opens `<tool_call>`, the call must name an offered function and its
  arguments must fit that function's `parameters`, in the Hermes format the prompt asks for
  (chat.py). A forced call (tool_choice "required" or a named function) is constrained from
  the first token, since the prompt already holds its opening. Text outside calls stays free.

A schema the grammar cannot enforce is a 400 for response_format and for a function marked
`strict`; any other function's arguments then fall back to "any JSON object".
"""

from __future__ import annotations

import json
import logging

from kiln_ray.api.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from kiln_ray.api.errors import APIError
from kiln_ray.api.schemas import ResponseFormat, Tool
from kiln_ray.engine.guide import Guide
from kiln_ray.engine.json_grammar import SchemaError, compile_schema, sequence

log = logging.getLogger("kiln_ray.api")

_ANY_OBJECT = {"type": "object"}


def response_guide(response_format: ResponseFormat | None) -> Guide | None:
    if response_format is None or response_format.type == "text":
        return None
    schema = _ANY_OBJECT if response_format.type == "json_object" else response_format.json_schema.schema_
    try:
        grammar = compile_schema(_ANY_OBJECT if schema is None else schema)
    except SchemaError as error:
        raise APIError(400, f"response_format.json_schema.schema: {error}", "response_format") from None
    return Guide(grammar, after="stop")


def tool_guide(tools: list[Tool] | None, forced_prefix: str) -> Guide | None:
    """The guide of the tool calls a reply may make (`tools`: the offered ones);
    `forced_prefix`: what the prompt ends with when a call is forced (chat.forced_call_prefix)."""
    if not tools:
        return None
    choices = []
    for tool in tools:
        fn = tool.function
        schema = fn.parameters if fn.parameters else _ANY_OBJECT
        try:
            compile_schema(schema)
        except SchemaError as error:
            if fn.strict:
                raise APIError(400, f"tools: function {fn.name!r} parameters: {error}", "tools") from None
            log.info("tool %s: its parameters cannot be enforced (%s); any JSON object is accepted", fn.name, error)
            schema = _ANY_OBJECT
        opening = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(fn.name, ensure_ascii=False)}, "arguments": '
        choices.append((opening.encode(), schema, f"}}\n{TOOL_CALL_CLOSE}".encode()))
    return Guide(sequence(choices), after="free", consumed=forced_prefix.encode(), trigger=TOOL_CALL_OPEN.encode())
