"""The text side of the OpenAI chat API: messages -> prompt ids, and output ids -> text.

The engine sees only token ids. This module turns OpenAI-shaped chat messages into prompt
ids through the model's chat template (`render_chat`), turns streamed output ids back into
text without splitting a character (`IncrementalDetokenizer`), cuts the text at stop strings
(`StopMatcher`) and lifts Hermes-style `<tool_call>` blocks out of it (`parse_tool_calls`,
`ToolCallStreamParser`). Everything here is plain Python over a transformers tokenizer.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Hermes tool-use system block, worded as Qwen's template words it, for templates that have no
# tool support of their own. `{tools}` receives one JSON object per line.
HERMES_TOOLS_PROMPT = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_ROLES = frozenset({"system", "user", "assistant", "tool"})
# What the renderer supplies itself, which a request may not override through kwargs:
# apply_chat_template's and render_jinja_template's parameters, the names the template is
# rendered with (`messages`), and the template's globals (a kwarg would shadow a function the
# template calls). `render_chat` adds the tokenizer's special-token names (`bos_token`, ...).
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}) | frozenset(ImmutableSandboxedEnvironment().globals) | {"raise_exception", "strftime_now"}
_REPLACEMENT_CHAR = "\ufffd"


class ChatFormatError(ValueError):
    """A request's messages, tools or template kwargs cannot be rendered (a client error)."""


# ---------------------------------------------------------------------------------------------
# Messages -> prompt ids
# ---------------------------------------------------------------------------------------------


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """Render OpenAI chat messages through the tokenizer's chat template; return prompt ids.

    messages: [{"role": "system" | "developer" | "user" | "assistant" | "tool",
                "content": str | None | [{"type": "text", "text": str}, ...],
                "tool_calls"?: [{"id": str, "type": "function",
                                 "function": {"name": str, "arguments": str (JSON)}}],
                "tool_call_id"?: str}, ...]
    tools: OpenAI tool objects [{"type": "function", "function": {...}}, ...] or None.
    Returns a new list[int]; `messages` and `tools` are not mutated.

    `developer` renders as `system`, text parts are joined with "\\n", None content is "".
    Tool-call arguments reach the template as dicts (HF's documented shape). A template that
    mentions `tools` renders tools, calls and results itself; otherwise the tools go into the
    system message as `HERMES_TOOLS_PROMPT`, calls become `<tool_call>` text and results
    `<tool_response>` user turns. Control-token text inside messages (e.g. "<|im_end|>") is
    encoded as plain text, so a client cannot forge a turn boundary.
    Raises ChatFormatError for: no messages, an unknown role, a non-text part, unparsable
    arguments, a reserved chat_template_kwargs key, or a template that rejects the chat.
    """
    if not messages:
        raise ChatFormatError("messages must contain at least one message")
    template_kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(template_kwargs.keys() & (_RESERVED_TEMPLATE_KWARGS | tokenizer.special_tokens_map.keys()))
    if reserved:
        raise ChatFormatError(f"chat_template_kwargs may not set {reserved}")
    tools = tools or None
    native_tools = "tools" in tokenizer.get_chat_template(tools=tools)
    conversation = [_normalize_message(message) for message in messages]
    if not native_tools:
        conversation = _inline_tool_turns(conversation)
        if tools:
            conversation = _with_hermes_tools(conversation, tools)
    try:
        rendered = tokenizer.apply_chat_template(
            conversation,
            tools=tools if native_tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **template_kwargs,
        )
    except TemplateError as error:
        raise ChatFormatError(f"the chat template rejected the conversation: {error}") from error
    # transformers 5 returns a BatchEncoding unless return_dict=False; accept either shape.
    ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
    return [int(token_id) for token_id in ids]


def _normalize_message(message: dict) -> dict:
    """One OpenAI message -> a template message: known role, str content, dict arguments."""
    role = message.get("role")
    role = "system" if role == "developer" else role
    if role not in _ROLES:
        raise ChatFormatError(f"unknown message role {role!r}")
    normalized = {**message, "role": role, "content": _text_content(message.get("content"))}
    if message.get("tool_calls"):
        normalized["tool_calls"] = [_template_tool_call(call) for call in message["tool_calls"]]
    return normalized


def _text_content(content: Any) -> str:
    """OpenAI content (str, None or a list of text parts) -> one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        kind = type(content).__name__
        raise ChatFormatError(f"message content must be a string, null or a list of parts, not {kind}")
    texts = []
    for part in content:
        part_type = part.get("type") if isinstance(part, dict) else type(part).__name__
        if part_type != "text" or not isinstance(part.get("text"), str):
            raise ChatFormatError(f"unsupported content part type {part_type!r}: only 'text' is accepted")
        texts.append(part["text"])
    return "\n".join(texts)


def _template_tool_call(call: dict) -> dict:
    """An OpenAI tool call -> the same call with `function.arguments` decoded to a dict."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ChatFormatError(f"tool call needs a function with a name: {call!r}")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            name = function["name"]
            raise ChatFormatError(f"tool call {name!r} arguments are not JSON: {error}") from error
    return {**call, "type": "function", "function": {**function, "arguments": arguments}}


def _inline_tool_turns(conversation: list[dict]) -> list[dict]:
    """Write tool calls and results as Hermes text, for templates that know no tools.

    Assistant `tool_calls` are appended to the content as `<tool_call>` blocks; a run of
    consecutive tool messages becomes one user message of `<tool_response>` blocks (as Qwen's
    template renders them), which templates that insist on user/assistant turns accept.
    """
    inlined: list[dict] = []
    previous_was_tool = False
    for message in conversation:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_was_tool:
                inlined[-1]["content"] += "\n" + response
            else:
                inlined.append({"role": "user", "content": response})
        elif message.get("tool_calls"):
            blocks = [_hermes_call_text(call["function"]) for call in message["tool_calls"]]
            content = "\n".join(([message["content"]] if message["content"] else []) + blocks)
            inlined.append({"role": message["role"], "content": content})
        else:
            inlined.append(message)
        previous_was_tool = message["role"] == "tool"
    return inlined


def _hermes_call_text(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def _with_hermes_tools(conversation: list[dict], tools: list[dict]) -> list[dict]:
    """Append the Hermes tool block to the leading system message (prepend one if absent)."""
    tool_lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    block = HERMES_TOOLS_PROMPT.format(tools=tool_lines)
    if conversation[0]["role"] == "system":
        system = conversation[0]["content"]
        first = {**conversation[0], "content": f"{system}\n\n{block}" if system else block}
        return [first, *conversation[1:]]
    return [{"role": "system", "content": block}, *conversation]


# ---------------------------------------------------------------------------------------------
# Output ids -> text
# ---------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas that never split a character.

    Invariant: the deltas returned by every `push` plus `flush` concatenate to exactly
    `tokenizer.decode(all_ids, skip_special_tokens=...)`. Byte-level BPE tokens can end inside
    a multi-byte UTF-8 character, which decodes to U+FFFD; such a tail is held back until a
    later token completes it (or `flush` releases it as the full decode has it).

    Only a window of recent ids is decoded per push (vLLM's prefix/read offsets):

        ids:  ... | already emitted | emitted last time | new, not yet emitted |
                                    ^ prefix_offset    ^ read_offset          ^ len(ids)

    decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text. prefix_offset always
    sits on a character boundary, so decoding from it agrees with the full decode.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text returned by `push`/`flush` so far."""
        return "".join(self._pieces)

    def push(self, token_ids: list[int]) -> str:
        """Append `token_ids`; return the text they complete ("" while a character is partial)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(window_text[len(prefix_text):], self._read_offset)

    def flush(self) -> str:
        """End of stream: return any held-back text, incomplete characters as U+FFFD.

        The stream is over afterwards; pushing more ids would split what flush released.
        """
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(window_text[len(prefix_text):], len(self._ids))

    def _emit(self, delta: str, prefix_offset: int) -> str:
        self._prefix_offset, self._read_offset = prefix_offset, len(self._ids)
        self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


# ---------------------------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------------------------


class StopMatcher:
    """Cuts a text stream before the first stop string, as OpenAI's `stop` does.

    The stream stops at the earliest position where any stop string is complete, so the result
    does not depend on how the text was split into pushes. Text that could still begin a stop
    string is held back until it is ruled out (or `flush`). The stop string is not emitted.
    `stopped` turns True at the match and stays True.
    """

    def __init__(self, stops: list[str]):
        """stops: non-empty strings (ValueError otherwise); an empty list passes text through."""
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Feed `text`; return (text safe to emit now, whether the stream has stopped).

        Once stopped, every push returns ("", True).
        """
        if self.stopped:
            return "", True
        buffer = self._held + text
        # The match completed first wins; on a tie, the one starting earlier (the longer stop).
        matches = [(start + len(stop), start) for stop in self._stops if (start := buffer.find(stop)) >= 0]
        if matches:
            _, start = min(matches)
            self.stopped, self._held = True, ""
            return buffer[:start], True
        keep = _partial_prefix_len(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """End of stream: return the held-back text ("" if stopped)."""
        held, self._held = self._held, ""
        return held


def _partial_prefix_len(text: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `patterns`."""
    longest = max((len(pattern) for pattern in patterns), default=0)
    for length in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-length:]
        if any(len(pattern) > length and pattern.startswith(tail) for pattern in patterns):
            return length
    return 0


# ---------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForcedCall:
    """A tool call the reply must open with: of function `name`, or of any (None)."""

    name: str | None = None


def forced_call_prefix(forced: ForcedCall | None) -> str:
    """The text a reply is made to start with so that it opens a tool call (appended to the
    prompt after the generation prompt, then fed to the tool-call parser before the model's
    text): the open tag and, for a named function, its name up to the arguments. The model
    writes the rest (for any function, its name too)."""
    if forced is None:
        return ""
    if forced.name is None:
        return f'{TOOL_CALL_OPEN}\n{{"name": "'
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(forced.name, ensure_ascii=False)}, "arguments": '


def _new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)  # 18 bytes -> 24 url-safe characters


@dataclass(frozen=True)
class ToolCall:
    """One parsed function call: `arguments` is a compact JSON object string."""

    name: str
    arguments: str
    id: str = field(default_factory=_new_call_id)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, tool calls) in Hermes/Qwen format.

    A call is `<tool_call>{"name": str, "arguments"|"parameters": object | JSON string}
    </tool_call>`, whitespace around the JSON allowed. Content is the text outside the valid
    calls, stripped, or None if empty. A malformed or unclosed block stays in the content.
    """
    parser = ToolCallStreamParser()
    items = parser.push(text) + parser.flush()
    content = "".join(item for item in items if isinstance(item, str)).strip()
    return content or None, [item for item in items if isinstance(item, ToolCall)]


class ToolCallStreamParser:
    """The streaming form of `parse_tool_calls`.

    Content is released as it arrives, except a tail that may be the start of `<tool_call>`.
    Inside a block nothing is released until `</tool_call>`, then the whole call (or, if
    malformed, the block's text as content). For any split of a text into pushes, the items
    of all pushes plus `flush` give `parse_tool_calls`'s result (content before stripping).
    A push costs O(len(delta) + held text); the held text is at most one open block.
    """

    def __init__(self):
        self._pending = ""  # outside a block: a possible partial open tag; inside: the body so far
        self._inside = False

    def push(self, delta_text: str) -> list[str | ToolCall]:
        """Feed text; return the content strings and ToolCalls it completes, in order."""
        items: list[str | ToolCall] = []
        text, self._pending = self._pending + delta_text, ""
        while True:
            if self._inside:
                end = text.find(TOOL_CALL_CLOSE)
                if end < 0:
                    self._pending = text
                    return items
                body, text = text[:end], text[end + len(TOOL_CALL_CLOSE) :]
                call = _parse_call_body(body)
                _append(items, call if call is not None else TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
                self._inside = False
            else:
                start = text.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _partial_prefix_len(text, (TOOL_CALL_OPEN,))
                    _append(items, text[: len(text) - keep])
                    self._pending = text[len(text) - keep :]
                    return items
                _append(items, text[:start])
                text = text[start + len(TOOL_CALL_OPEN) :]
                self._inside = True

    def flush(self) -> list[str | ToolCall]:
        """End of stream: return the held text (an unclosed block as content, tag included)."""
        rest = (TOOL_CALL_OPEN if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        return [rest] if rest else []


def _append(items: list[str | ToolCall], item: str | ToolCall) -> None:
    """Append to `items`, merging adjacent content strings and dropping empty ones."""
    if isinstance(item, str) and items and isinstance(items[-1], str):
        items[-1] += item
    elif not isinstance(item, str) or item:
        items.append(item)


def _parse_call_body(body: str) -> ToolCall | None:
    """The JSON between the tags -> a ToolCall, or None if it is not a well-formed call."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(name=call["name"], arguments=compact)
