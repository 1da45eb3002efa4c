"""StreamDecoder: generated ids to text as they arrive."""

from __future__ import annotations

from collections.abc import Sequence

from zamba2.tokenizer.core import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class StreamDecoder:
    """Turn generated ids into text as they arrive: push(id) returns only newly completed text.

    It decodes a short window of ids (the last emitted chunk plus what is pending) and emits the part
    past the window's previous text, so SentencePiece word-boundary spaces come out right. While the
    window's text ends in U+FFFD it holds back: a multi-byte character is still arriving as byte-fallback
    tokens. For ids that decode to valid UTF-8, the concatenated output equals
    `tokenizer.decode(all_ids, skip_special_tokens)`. `max_pending` bounds the hold (a character needs
    at most 4 byte tokens) so invalid byte sequences cannot stall the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, max_pending: int = 8,
                 context: Sequence[int] = ()) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        # `context`: ids that come before the stream (a prompt's last few), decoded as if already emitted, so
        # the first new token reads as it does after them: its word-boundary space is kept, where decoding the
        # new ids alone would strip it as the start of a text.
        self._ids: list[int] = [int(i) for i in context]  # the window: the last emitted chunk, then pending ids
        self._read = len(self._ids)  # ids before this index have been emitted

    def _decode(self, stop: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[:stop], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character or word is still pending)."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # contributes nothing to the decoded text
        self._ids.append(int(token_id))
        text = self._decode()
        if text.endswith(_REPLACEMENT_CHAR) and len(self._ids) - self._read < self.max_pending:
            return ""
        new = text[len(self._decode(self._read)) :]
        if new:  # the chunk just emitted anchors the next window
            del self._ids[: self._read]
            self._read = len(self._ids)
        return new

    def flush(self) -> str:
        """Return whatever is still held back and reset for a new stream."""
        new = self._decode()[len(self._decode(self._read)) :]
        self._ids, self._read = [], 0
        return new
