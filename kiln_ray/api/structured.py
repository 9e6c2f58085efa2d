"""Structured output: the guides (kiln_ray/engine/guide.py) a request's fields ask for.

- `response_format` json_object: the reply is one JSON object; json_schema: one JSON document
  valid for the schema (the subset kiln_ray/engine/json_grammar.py enforces). Then EOS.
- tools: once the reply opens `<tool_call>`, the call must name an offered function and its
  arguments must fit that function's `parameters`, in the Hermes format the prompt asks for
  (chat.py). A forced call (tool_choice "required" or a named function) is constrained from
  the first token, since the prompt already holds its opening. Text outside calls stays free.

- vLLM's extensions: `guided_json` (a schema), `guided_choice` (the reply is exactly one of
  the strings), `guided_regex` (the whole reply matches it; kiln_ray/engine/regex_dfa.py has
  the syntax), `structured_outputs` ({"json": schema}, {"choice": [...]} or {"regex": ...}).

A schema the grammar cannot enforce is a 400 for these and for a function marked `strict`; any other function's arguments then fall back to "any JSON object".
"""

from __future__ import annotations

import json
import logging

from kiln_ray.api.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from kiln_ray.api.errors import APIError
from kiln_ray.api.schemas import SamplingFields, Tool
from kiln_ray.engine.guide import Guide
from kiln_ray.engine.json_grammar import SchemaError, choice, compile_schema, regex, sequence

log = logging.getLogger("kiln_ray.api")

_ANY_OBJECT = {"type": "object"}


def response_guide(body: SamplingFields) -> Guide | None:
    """The guide of a request's output format: response_format, or vLLM's guided_json /
    guided_choice / structured_outputs (schemas.py allows one of them)."""
    fmt, structured = body.response_format, body.structured_outputs
    choices = body.guided_choice or (structured.choice if structured is not None else None)
    if choices is not None:
        param = "guided_choice" if body.guided_choice else "structured_outputs"
        return Guide(_compiled(choice, choices, param), after="stop")
    pattern = body.guided_regex or (structured.regex if structured is not None else None)
    if pattern is not None:
        param = "guided_regex" if body.guided_regex else "structured_outputs"
        return Guide(_compiled(regex, pattern, param), after="stop")
    if body.guided_json is not None:
        schema, param = body.guided_json, "guided_json"
    elif structured is not None:
        schema, param = structured.json_, "structured_outputs"
    elif fmt is not None and fmt.type != "text":
        schema = _ANY_OBJECT if fmt.type == "json_object" else fmt.json_schema.schema_
        param = "response_format"
    else:
        return None
    return Guide(_compiled(compile_schema, _ANY_OBJECT if schema is None else schema, param), after="stop")


def _compiled(build, spec, param: str):
    try:
        return build(spec)
    except SchemaError as error:
        raise APIError(400, f"{param}: {error}", param) from None


def tool_guide(tools: list[Tool] | None, forced_prefix: str) -> Guide | None:
    """The guide of the tool calls a reply may make (`tools`: the offered ones);
    `forced_prefix`: what the prompt ends with when a call is forced (chat.forced_call_prefix)."""
    if not tools:
        return None
    try:  # one compile in the usual case; a failure is sorted out per tool below
        grammar = sequence([_call_text(tool, _parameters(tool)) for tool in tools])
    except SchemaError:
        try:
            grammar = sequence([_call_text(tool, _enforceable_parameters(tool)) for tool in tools])
        except SchemaError as error:  # each can be enforced, not all of them together
            raise APIError(400, f"tools: the functions' parameters together: {error}", "tools") from None
    return Guide(grammar, after="free", consumed=forced_prefix.encode(), trigger=TOOL_CALL_OPEN.encode())


def _parameters(tool: Tool):
    return tool.function.parameters or _ANY_OBJECT


def _enforceable_parameters(tool: Tool):
    fn = tool.function
    try:
        compile_schema(_parameters(tool))
    except SchemaError as error:
        if fn.strict:
            raise APIError(400, f"tools: function {fn.name!r} parameters: {error}", "tools") from None
        log.info("tool %s: its parameters cannot be enforced (%s); any JSON object is accepted", fn.name, error)
        return _ANY_OBJECT
    return _parameters(tool)


def _call_text(tool: Tool, schema) -> tuple[bytes, object, bytes]:
    """A call of `tool` in the Hermes format: opening + arguments (`schema`) + closing."""
    opening = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(tool.function.name, ensure_ascii=False)}, "arguments": '
    return opening.encode(), schema, f"}}\n{TOOL_CALL_CLOSE}".encode()
