"""Streaming detokenization: text pieces as tokens arrive, adding up to the full decode.

Decoding one token at a time is wrong in three common ways: a character's UTF-8 bytes split
over byte-level or byte-fallback tokens (``<0xE2>`` ``<0x82>`` ``<0xAC>`` is one "€"), a
sentencepiece decoder that drops the leading space of whatever it decodes first ("▁world"
alone is "world", after "Hello" it is " world"), and special tokens. So each step decodes a
short window of the latest ids and emits only what the newest ones added:

1. ``prefix`` = the last few ids already emitted (context), ``read`` = where new ids start.
2. text(prefix + new) minus text(prefix) is the new piece, emitted unless it ends in U+FFFD,
   the replacement character a decoder gives for an incomplete UTF-8 sequence: then wait
   for the token that completes it.
3. On emission the window moves up; ``flush()`` emits whatever is still held back.

Byte-fallback tokens need one more rule: sentencepiece-style decoders turn a whole run of
``<0xNN>`` tokens into text at once, and an invalid run becomes one U+FFFD per byte, valid
bytes inside it included ('a' then a stray continuation byte decodes to two U+FFFD, not 'a').
So nothing is emitted while the newest token is a byte-fallback one; the run's text is known
when a regular token follows.

Special tokens are dropped from the ids up front when ``skip_special_tokens`` (as the full
decode drops them before its decoder runs), so they never sit at a window's start.
With ``prompt_ids`` the pieces continue the prompt's text (the first piece keeps its leading
space); without, they add up to ``tokenizer.decode(generated_ids)``.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol

REPLACEMENT = "\ufffd"
# Context ids kept before the new ones: enough that a window never starts with a token whose
# text depends on what precedes it (vLLM keeps 5 for the same reason).
CONTEXT_TOKENS = 5


class Decodes(Protocol):
    special_ids: frozenset[int]
    byte_fallback_ids: frozenset[int]  # <0xNN> tokens of a byte-fallback vocabulary; empty otherwise

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """``push(id)`` -> new text ('' while a character is incomplete); ``flush()`` -> the rest."""

    def __init__(self, tokenizer: Decodes, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = self._kept([int(i) for i in prompt_ids])
        self.read = len(self.ids)  # ids before this index are already in the emitted text
        self.prefix = self._context_start()

    def _kept(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.tokenizer.special_ids] if self.skip else ids

    def _window_texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (decode(self.ids[self.prefix:self.read], skip_special_tokens=False),
                decode(self.ids[self.prefix:], skip_special_tokens=False))

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes (possibly '')."""
        if not self._kept([int(token_id)]):
            return ""
        self.ids.append(int(token_id))
        if token_id in self.tokenizer.byte_fallback_ids:
            return ""  # the byte run may go on; its text depends on all of it
        before, after = self._window_texts()
        if after.endswith(REPLACEMENT) or len(after) <= len(before) or not after.startswith(before):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        return self._emit(after[len(before):])

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end shows as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before, after = self._window_texts()
        return self._emit(after[len(os.path.commonprefix([before, after])):])

    def _emit(self, piece: str) -> str:
        self.read = len(self.ids)
        self.prefix = self._context_start()
        return piece

    def _context_start(self) -> int:
        """Where the window starts: ``CONTEXT_TOKENS`` before ``read``, but never inside a run of
        byte-fallback tokens (a partial run decodes differently from the whole one): past the run
        when a regular token follows it in the context, else back to the run's start."""
        start, run = max(0, self.read - CONTEXT_TOKENS), self.tokenizer.byte_fallback_ids
        if not run or start == 0 or self.ids[start - 1] not in run or self.ids[start] not in run:
            return start
        ahead = start
        while ahead < self.read and self.ids[ahead] in run:
            ahead += 1
        if ahead < self.read:
            return ahead
        while start > 0 and self.ids[start - 1] in run:
            start -= 1
        return start


def stream_text(tokenizer: Decodes, ids: Iterable[int], prompt_ids: Iterable[int] = ()) -> list[str]:
    """Every non-empty piece an ``IncrementalDetokenizer`` gives for ``ids``, flush included."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    return [p for p in pieces if p]


__all__ = ["IncrementalDetokenizer", "stream_text", "CONTEXT_TOKENS"]
