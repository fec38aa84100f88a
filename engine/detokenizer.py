"""Incremental detokenization, to find stop strings as tokens are generated.

Decoding the whole answer after every token costs O(n^2) over an answer of n tokens. Here each
token decodes only a short window: the tokens since the last settled boundary, minus the same
window without the new ones (so a leading-space rule of the tokenizer applies to both and
cancels out). Text that ends in an incomplete character (U+FFFD) is not settled until the
character completes. Only the tail of the text that can hold a new stop string is searched.
"""

from __future__ import annotations

from collections.abc import Callable


class Detokenizer:
    """The text of one request's generated tokens, and where a stop string first appears.

    >>> detok = Detokenizer(lambda ids: "".join(map(chr, ids)), stop=("c", "bc"))
    >>> [detok.append(t) for t in b"abcd"]
    [None, None, 'a', None]
    """

    __slots__ = ("_decode", "_stop", "_ids", "_text", "_prefix_offset", "_read_offset")

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self._decode = decode
        self._stop = stop
        self._ids: list[int] = []
        self._text = ""  # the settled text: decode(ids[:read_offset])
        self._prefix_offset = 0  # the window starts here ...
        self._read_offset = 0  # ... and its tokens up to here are settled text

    def append(self, token: int) -> str | None:
        """Takes the next generated token. Returns the text before the first stop string once
        one has appeared (the text so far equals a full decode), else None."""
        ids = self._ids
        ids.append(token)
        settled = self._decode(ids[self._prefix_offset : self._read_offset])
        window = self._decode(ids[self._prefix_offset :])
        text = self._text + window[len(settled) :]
        searched = len(self._text)  # text before this point was searched after earlier tokens
        if len(window) > len(settled) and not window.endswith("\ufffd"):
            self._text = text
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        starts = [
            i
            for stop in self._stop
            if (i := text.find(stop, max(0, searched - len(stop) + 1))) >= 0
        ]
        return text[: min(starts)] if starts else None
