"""Response bodies in OpenAI's shapes (chat.completion, chat.completion.chunk,
text_completion), built as plain dicts from ChoiceText / Delta."""

from __future__ import annotations

import json

from kiln_ray.api.chat import ToolCall
from kiln_ray.api.generation import ChoiceText, Delta, LogprobEntry


def usage(choices: list[ChoiceText], num_prompt_tokens: int) -> dict:
    completion = sum(c.num_tokens for c in choices)
    out = {"prompt_tokens": num_prompt_tokens, "completion_tokens": completion, "total_tokens": num_prompt_tokens + completion}
    cached = max((c.num_cached_tokens for c in choices), default=0)
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    body = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return body if index is None else {"index": index, **body}


def chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[LogprobEntry], text_offset: int) -> dict:
    offsets, pos = [], text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def chat_completion(rid: str, created: int, model: str, choices: list[ChoiceText], want_logprobs: bool, num_prompt: int) -> dict:
    out = []
    for c in choices:
        message: dict = {"role": "assistant", "content": c.text or (None if c.tool_calls else "")}
        if c.tool_calls:
            message["tool_calls"] = [tool_call_json(t) for t in c.tool_calls]
        out.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage(choices, num_prompt),
    }


def chat_chunk(rid: str, created: int, model: str, choice_deltas: list[dict], usage_body: dict | None = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choice_deltas}
    if usage_body is not None:
        body["usage"] = usage_body
    return sse(body)


def chat_delta(delta: Delta, choice: ChoiceText, want_logprobs: bool, first: bool) -> dict | None:
    """The chunk entry for one choice's delta; None when there is nothing to send."""
    body: dict = {}
    if first:
        body["role"] = "assistant"
    if delta.text or first:
        body["content"] = delta.text
    if delta.tool_calls:
        start = len(choice.tool_calls) - len(delta.tool_calls)
        body["tool_calls"] = [tool_call_json(t, start + i) for i, t in enumerate(delta.tool_calls)]
    if not body and delta.finish_reason is None and not (want_logprobs and delta.logprobs):
        return None
    return {
        "index": delta.index,
        "delta": body,
        "logprobs": chat_logprobs(delta.logprobs) if want_logprobs and delta.logprobs else None,
        "finish_reason": delta.finish_reason,
    }


def text_completion(rid: str, created: int, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": usage_body}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], usage_body: dict | None = None) -> str:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return sse(body)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
