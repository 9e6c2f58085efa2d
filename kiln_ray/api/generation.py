"""From engine outputs (token ids) to what a client sees, per choice: text deltas with stop
strings applied, tool calls, logprobs, finish reasons and token counts.

One `ChoiceText` per sequence of a request. The engine keeps generating a sequence until EOS,
a stop token or max_tokens; a stop *string* ends the choice here, and the caller aborts the
engine request once every choice of it has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln_ray.api.chat import IncrementalDetokenizer, StopMatcher, ToolCall, ToolCallStreamParser
from kiln_ray.engine.request import RequestOutput, TokenLogprob

# What OpenAI reports for a token the model gives (next to) no chance; the floor for every
# logprob, so -inf and NaN (weights that are not finite) never reach JSON, which has neither.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class LogprobEntry:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class Delta:
    """What one engine increment changed in one choice."""

    index: int
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """One Delta per choice, in the order the choices first appear: increments of one choice
    that arrived together (the engine outran its consumer) joined, so a chunk never holds two
    entries for one choice index (clients read one per index)."""
    merged: dict[int, Delta] = {}
    for d in deltas:
        into = merged.get(d.index)
        if into is None:
            merged[d.index] = Delta(d.index, d.text, list(d.tool_calls), list(d.logprobs), d.finish_reason)
            continue
        into.text += d.text
        into.tool_calls += d.tool_calls
        into.logprobs += d.logprobs
        into.finish_reason = d.finish_reason or into.finish_reason
    return list(merged.values())


class ChoiceText:
    def __init__(self, tokenizer, index: int, stops: list[str], parse_tools: bool, skip_special_tokens: bool,
                 forced_text: str = "", single_call: bool = False):
        """forced_text: what the prompt already ends with and the reply is read as starting
        with (the open of a forced tool call, `forced_call_prefix`); single_call: the choice
        ends at its first tool call (finish_reason "tool_calls")."""
        self.tokenizer = tokenizer
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stops = StopMatcher(stops)
        self.tools = ToolCallStreamParser() if parse_tools else None
        self.single_call = single_call
        if forced_text:
            if self.tools is None:
                raise ValueError("forced_text needs parse_tools")
            if self.tools.push(forced_text):
                raise ValueError("forced_text must open a tool call")
        self.text = ""
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[LogprobEntry] = []
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: RequestOutput) -> Delta:
        """Take one increment of this choice's sequence. After the choice finished (a stop
        string), further increments change nothing."""
        delta = Delta(self.index)
        if self.finished:
            return delta
        self.num_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.logprobs:
            delta.logprobs = [self._logprob_entry(lp) for lp in out.logprobs]
            self.logprobs.extend(delta.logprobs)
        text, stopped = self.stops.push(self.detokenizer.push(out.new_token_ids))
        if out.finished and not stopped:
            tail, stopped_at_end = self.stops.push(self.detokenizer.flush())
            text += tail
            if not stopped_at_end:
                text += self.stops.flush()
            stopped = stopped_at_end
        if self._emit(delta, text, final=out.finished or stopped):
            stopped = True
        if stopped:
            delta.finish_reason = "stop"
        elif out.finished:
            delta.finish_reason = "length" if out.finish_reason == "length" else "stop"
        if delta.finish_reason == "stop" and self.tool_calls:
            delta.finish_reason = "tool_calls"
        self.finish_reason = delta.finish_reason
        return delta

    def _emit(self, delta: Delta, text: str, final: bool) -> bool:
        """Put `text` into `delta` (content, or tool calls when parsing them). Returns True
        when a single-call choice has just made its call: what follows it is dropped."""
        ended = False
        if self.tools is None:
            delta.text = text
        else:
            pieces = self.tools.push(text) + (self.tools.flush() if final else [])
            for piece in pieces:
                if isinstance(piece, ToolCall):
                    delta.tool_calls.append(piece)
                    if self.single_call:
                        ended = True
                        break
                else:
                    delta.text += piece
            self.tool_calls.extend(delta.tool_calls)
        self.text += delta.text
        return ended

    def _logprob_entry(self, lp: TokenLogprob) -> LogprobEntry:
        decode = self.tokenizer.decode
        return LogprobEntry(decode([lp.token_id]), _reportable(lp.logprob),
                            tuple((decode([t]), _reportable(v)) for t, v in lp.top))


def _reportable(logprob: float) -> float:
    """The logprob floored at MIN_LOGPROB; NaN (which compares False) becomes the floor too."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB
