"""Guided decoding: a request's tokens kept inside a JSON grammar (kiln_ray/engine/json_grammar.py).

    Guide (SamplingParams.guide, built by the ingress)  ->  GuideState per sequence (engine)
        state: the grammar's parse position, or None while the sequence is free
        mask(): which token ids may come next     <- Sampler, before temperature and logprobs
        advance(token): read the sampled token    <- LLMEngine, after each sample

A token is allowed when all its bytes continue the grammar (TokenVocabulary walks the vocabulary
sorted by bytes, so one failing byte rules out every token that starts with it). Masks are
cached per (grammar, state) in a GuideRuntime, which the engine shares between requests with the
same grammar. Inside a string the mask is the vocabulary's "plain" tokens (whole UTF-8 characters,
no quote, backslash or control byte) that fit its maxLength and keep its pattern alive (cached per
pattern state), plus the few thousand others walked one by one: a string that counts its length
changes state with every token, and costs ~1-5 ms a token on SmolLM2's vocabulary.

Once a document is complete a "stop" guide allows only stop tokens (EOS), a "free" guide lets the
sequence go on unconstrained. A guide with a `trigger` starts free and (re)starts its grammar
whenever the output shows the trigger: tool calls under tool_choice "auto" are free text until
the model opens `<tool_call>`, then the call must be one of the offered functions with arguments
that fit its parameters.

Only token bytes are seen here, never decoded text (the ingress keeps the text).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from kiln_ray.engine.json_grammar import Grammar, GrammarOverflow, State
from kiln_ray.engine.regex_dfa import Regex

log = logging.getLogger("kiln_ray.engine")

MASK_CACHE_SIZE = 128  # masks kept per grammar (bool, one byte per token id: 6 MiB at 49k tokens)
PATTERN_MASK_CACHE_SIZE = 128  # plain tokens per (string pattern, DFA state), for every grammar


@dataclass(frozen=True, eq=False)
class Guide:
    """What a request's output must follow. `consumed`: bytes the grammar has read already (the
    prompt ends with them, e.g. a forced tool call's opening); `trigger`: start free, and start
    the grammar where these bytes appear in the output (the grammar begins with them)."""

    grammar: Grammar
    after: Literal["stop", "free"] = "stop"
    consumed: bytes = b""
    trigger: bytes = b""


class TokenVocabulary:
    """The bytes of every token id, sorted for prefix walks. A None entry is never allowed inside
    a document (special tokens such as EOS, ids the tokenizer does not have)."""

    def __init__(self, token_bytes: list[bytes | None]):
        self.size = len(token_bytes)
        self.token_bytes = token_bytes
        entries = sorted((b, i) for i, b in enumerate(token_bytes) if b)
        self.keys = [b for b, _ in entries]
        self.ids = [i for _, i in entries]
        # Plain tokens keep a string a string: whole UTF-8 characters, none a quote, backslash
        # or control byte. Byte pieces of a character are walked like the rest.
        plain = [(b, i) for b, i in entries if _plain_text(b)]
        self.plain_keys = [b for b, _ in plain]  # sorted, for walks through a string's pattern
        self.plain_ids = [i for _, i in plain]
        self.plain = torch.zeros(self.size, dtype=torch.bool)
        self.plain[self.plain_ids] = True
        self.plain_chars = torch.zeros(self.size, dtype=torch.int32)  # characters of each plain token
        self.plain_chars[self.plain_ids] = torch.tensor([len(b.decode()) for b, _ in plain], dtype=torch.int32)
        self.longest_plain = int(self.plain_chars.max()) if plain else 0
        self._pattern_masks: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        other = [(b, i) for b, i in entries if not self.plain[i]]
        self.other_keys = [b for b, _ in other]
        self.other_ids = [i for _, i in other]

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> TokenVocabulary:
        """Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) map bytes to printable
        characters; their tokens are read back through that map. Others (SentencePiece) go
        through the metaspace and <0xNN> byte-fallback conventions. Special tokens get None."""
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                special.add(tokenizer.convert_tokens_to_ids(token.content))
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
        byte_level = _is_byte_level(tokenizer)
        added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        out: list[bytes | None] = [None] * vocab_size
        for i, piece in enumerate(pieces):
            if piece is None or i in special:
                continue
            if piece in added:
                out[i] = piece.encode()
            elif byte_level:
                try:
                    out[i] = bytes(byte_of[ch] for ch in piece)
                except KeyError:
                    out[i] = piece.encode()
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode()
        return cls(out)

    def _plain_in_pattern(self, pattern: Regex, dfa: int) -> torch.Tensor:
        """The plain tokens a string's pattern keeps alive from its DFA state `dfa` (cached:
        a pattern has few states, and its strings change state far less often than length)."""
        key = (pattern.pattern, dfa)
        hit = self._pattern_masks.get(key)
        if hit is not None:
            self._pattern_masks.move_to_end(key)
            return hit
        step = lambda st, byte: None if (nxt := pattern.step(st, byte)) < 0 else nxt  # noqa: E731
        mask = torch.zeros(self.size, dtype=torch.bool)
        ids = _walk(step, dfa, self.plain_keys, self.plain_ids)
        if ids:
            mask[ids] = True
        self._pattern_masks[key] = mask
        if len(self._pattern_masks) > PATTERN_MASK_CACHE_SIZE:
            self._pattern_masks.popitem(last=False)
        return mask

    def allowed(self, grammar: Grammar, state: State) -> torch.Tensor:
        """Bool mask over token ids: the tokens whose bytes all continue `state`."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        step = lambda st, byte: grammar.step(st, byte) or None  # noqa: E731 - an empty state is dead
        runs = grammar.plain_text_runs(state)
        if runs is not None:
            for pattern, dfa, room in runs:
                plain = self.plain if pattern is None else self._plain_in_pattern(pattern, dfa)
                mask |= plain if room >= self.longest_plain else plain & (self.plain_chars <= room)
            ids = _walk(step, state, self.other_keys, self.other_ids)
        else:
            ids = _walk(step, state, self.keys, self.ids)
        if ids:
            mask[ids] = True
        return mask


def _walk(step: Callable, state, keys: list[bytes], ids: list[int]) -> list[int]:
    """Ids of the tokens in `keys` (sorted) whose bytes all step from `state` (`step(state,
    byte)` is None when dead). Tokens sharing a prefix share its steps; a dead prefix prunes
    all of them at once."""
    out: list[int] = []

    def walk(lo: int, hi: int, depth: int, st: State) -> None:
        # keys[lo:hi] all start with the same `depth` bytes, which led to `st`
        i = lo
        while i < hi and len(keys[i]) == depth:
            out.append(ids[i])
            i += 1
        while i < hi:
            key = keys[i]
            byte = key[depth]
            j = hi if byte == 255 else bisect.bisect_left(keys, key[:depth] + bytes([byte + 1]), i, hi)
            nxt = step(st, byte)
            if nxt is not None:
                walk(i, j, depth + 1, nxt)
            i = j

    walk(0, len(keys), 0, state)
    return out


class GuideRuntime:
    """One grammar over one vocabulary, with its masks cached (shared by requests)."""

    def __init__(self, grammar: Grammar, vocabulary: TokenVocabulary):
        self.grammar = grammar
        self.vocabulary = vocabulary
        self._masks: OrderedDict[State, torch.Tensor] = OrderedDict()

    def disallowed(self, state: State) -> torch.Tensor:
        """Bool mask of the token ids `state` rules out (stop tokens included)."""
        hit = self._masks.get(state)
        if hit is not None:
            self._masks.move_to_end(state)
            return hit
        mask = ~self.vocabulary.allowed(self.grammar, state)
        self._masks[state] = mask
        if len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return mask


class GuideState:
    """One sequence's position in its guide."""

    def __init__(self, guide: Guide, runtime: GuideRuntime, stop_token_ids: frozenset[int]):
        self.guide = guide
        self.runtime = runtime
        self.stop_token_ids = sorted(stop_token_ids)
        self.state: State | None = None
        self._tail = b""  # the output's last bytes, while watching for the trigger
        if guide.consumed or not guide.trigger:
            try:
                self._begin(guide.consumed)
            except GrammarOverflow as error:
                self.release(str(error))

    @property
    def constrained(self) -> bool:
        return self.state is not None

    @property
    def complete(self) -> bool:
        """A whole document has been read (a "stop" guide then lets the sequence stop, also
        before min_tokens: nothing else may follow it)."""
        return self.state is not None and self.runtime.grammar.complete(self.state)

    def mask(self) -> tuple[torch.Tensor, list[int], bool] | None:
        """(disallowed token ids as a bool mask, stop ids, whether those are allowed besides),
        or None: free. Stop ids are disallowed until the document is complete."""
        if self.state is None:
            return None
        grammar = self.runtime.grammar
        complete = grammar.complete(self.state)
        if grammar.finished(self.state) and not self.stop_token_ids:
            return None  # nothing may follow, and nothing can stop it (ignore_eos): leave it to max_tokens
        try:
            disallowed = self.runtime.disallowed(self.state)
        except GrammarOverflow as error:
            self.release(str(error))
            return None
        return disallowed, self.stop_token_ids, complete

    def advance(self, token_id: int) -> None:
        try:
            self._advance(token_id)
        except GrammarOverflow as error:
            self.release(str(error))

    def _advance(self, token_id: int) -> None:
        if token_id in self.stop_token_ids:
            return
        data = self.runtime.vocabulary.token_bytes[token_id] if token_id < self.runtime.vocabulary.size else None
        if self.state is None:
            self._watch(data or b"")
            return
        if data is None:
            self.release("a token outside the grammar's vocabulary was sampled")
            return
        state = self.runtime.grammar.feed(self.state, data)
        if not state:
            self.release("a token the grammar does not allow was sampled")
            return
        self.state = state
        if self.guide.after == "free" and self.runtime.grammar.complete(state):
            self.state = None
            self._tail = b""

    def _begin(self, data: bytes) -> bool:
        grammar = self.runtime.grammar
        state = grammar.feed(grammar.start, data)
        if state:
            self.state = state
        return bool(state)

    def _watch(self, data: bytes) -> None:
        trigger = self.guide.trigger
        if not trigger:
            return
        seen = self._tail + data
        at = seen.find(trigger)
        if at < 0:
            self._tail = seen[-(len(trigger) - 1):] if len(trigger) > 1 else b""
            return
        self._tail = b""
        if not self._begin(seen[at:]):
            self.state = None
            log.info("guided decoding: the output opened %r but went on outside the grammar", trigger)

    def release(self, why: str) -> None:
        """Give up on the guide (a token that went around the mask, which none can today, or a
        state too large): the sequence goes on free, it does not fail."""
        log.warning("guided decoding: %s; the sequence goes on unconstrained", why)
        self.state = None
        self._tail = b""


def apply_guides(logits: torch.Tensor, guides: list[GuideState | None]) -> None:
    """Mask each row's disallowed tokens to -inf (rows without a guide untouched)."""
    vocab = logits.shape[1]
    for i, g in enumerate(guides):
        if g is None:
            continue
        masked = g.mask()
        if masked is None:
            continue
        disallowed, stops, stops_allowed = masked
        stops = [t for t in stops if t < vocab]
        keep = logits[i, stops].clone() if stops_allowed and stops else None
        n = min(vocab, disallowed.shape[0])
        if bool(disallowed[:n].all()) and keep is None:
            g.release("no token fits the grammar")  # never an all -inf row (NaN softmax)
            continue
        logits[i, :n].masked_fill_(disallowed[:n], float("-inf"))
        if n < vocab:
            logits[i, n:] = float("-inf")
        if keep is not None:
            # min_tokens may have masked them: a complete document may stop regardless.
            logits[i, stops] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
        elif stops:
            logits[i, stops] = float("-inf")


def _plain_text(data: bytes) -> bool:
    if any(c == 0x22 or c == 0x5C or c < 0x20 for c in data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    import json

    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    return "ByteLevel" in kinds


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))
