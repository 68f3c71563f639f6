"""Generated token ids -> text pieces to stream, cut exactly at the first stop string.

A piece is released only when no stop string could still complete across it: the longest
tail of the pending text that is a prefix of some stop string is held back until the next
token decides. So the streamed pieces always concatenate to the final completion, and the
client never sees text that a later stop string would have removed.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Detokenizer(Protocol):
    """What ``moekit.inference.detokenize.IncrementalDetokenizer`` provides."""

    def push(self, token_id: int) -> str: ...  # text that is now final

    def flush(self) -> str: ...  # whatever is left once generation ends


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """Feeds token ids through a detokenizer; ``push`` returns the text safe to send now and
    sets ``stopped`` when a stop string appears (the text ends just before it)."""

    def __init__(self, detokenizer: Detokenizer, stops: Sequence[str] = ()):
        self._detok = detokenizer
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.text = ""  # everything released so far

    def push(self, token_id: int) -> str:
        return self._feed(self._detok.push(token_id), final=False)

    def finish(self) -> str:
        """The held-back rest, once generation ended for another reason (length, EOS)."""
        return "" if self.stopped else self._feed(self._detok.flush(), final=True)

    def _feed(self, new: str, final: bool) -> str:
        buf = self._pending + new
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return self._release(buf[: min(hits)])
        keep = 0 if final else _held_back(buf, self._stops)
        self._pending = buf[len(buf) - keep:]
        return self._release(buf[: len(buf) - keep])

    def _release(self, piece: str) -> str:
        self.text += piece
        return piece


__all__ = ["Detokenizer", "TextStream"]
