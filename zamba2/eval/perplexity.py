"""Perplexity of text documents: per token and in bits per byte, long texts in strided windows.

A document of N tokens (the tokenizer's bos first, unless turned off) is scored in windows of at most
`context_length` tokens. The first window scores every token after the first; each later window ends
`stride` tokens after the previous one and scores only those new tokens, with the `context_length - stride`
tokens before them as context. Every token after the first is scored exactly once:

    N = 10, context 6, stride 3:   window [0, 6) scores 1..5,  [3, 9) scores 6..8,  [4, 10) scores 9

A document that fits in one window is scored in one pass. `Scorer` is whatever gives the log-probabilities of
a batch of token sequences: the local model (zamba2.eval.score_tokens) or a server's echo (zamba2.eval.remote).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zamba2.jsonl import objects

# For each sequence, log p(seq[t] | seq[:t]) for t = 1 .. len(seq) - 1.
Scorer = Callable[[list[list[int]]], list[list[float]]]


@dataclass
class Document:
    name: str  # where it came from: the file, or file:line for a JSONL document
    text: str


@dataclass
class TextScore:
    """The log-likelihood of some text, summed in nats over its scored tokens."""

    name: str
    tokens: int  # scored tokens (all but the first)
    bytes: int  # UTF-8 bytes of the text
    logprob: float

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return -self.logprob / (math.log(2) * self.bytes)

    def as_dict(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "bytes": self.bytes, "logprob": self.logprob,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}  # fmt: skip


def read_documents(path: str | Path) -> list[Document]:
    """A .jsonl file holds one document per line ({"text": ...}); any other file is one document."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix != ".jsonl":
        if not raw.strip():
            raise ValueError(f"{path}: the file is empty")
        return [Document(str(path), raw)]
    docs = []
    for where, entry in objects(path, raw):
        if not isinstance(entry.get("text"), str) or not entry["text"]:
            raise ValueError(f'{where}: expected an object with a non-empty string "text"')
        docs.append(Document(where, entry["text"]))
    if not docs:
        raise ValueError(f"{path}: no documents (expected one JSON object per line)")
    return docs


def windows(n: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over n tokens: the window is [begin, end), its scored
    targets are [first, end)."""
    if not 1 <= stride < context_length:
        raise ValueError(f"stride must be in [1, context_length) = [1, {context_length}), got {stride}")
    if n <= context_length:
        return [(0, n, 1)]
    out = [(0, context_length, 1)]
    end = context_length
    while end < n:
        new_end = min(end + stride, n)
        out.append((new_end - context_length, new_end, end))
        end = new_end
    return out


def score_ids(scorer: Scorer, ids: Sequence[int], context_length: int, stride: int, batch: int = 8) -> float:
    """Sum of log p(ids[t] | the window's ids before t) over t = 1 .. len(ids) - 1."""
    spans = windows(len(ids), context_length, stride)
    total = 0.0
    for k in range(0, len(spans), batch):
        group = spans[k : k + batch]
        results = scorer([list(ids[b:e]) for b, e, _ in group])
        for (b, _, first), lps in zip(group, results, strict=True):
            total += math.fsum(lps[first - b - 1 :])  # lps[j] scores position b + 1 + j
    return total


def perplexity(scorer: Scorer, tokenizer, documents: Sequence[Document], context_length: int, stride: int,
               add_bos: bool = True, batch: int = 8) -> list[TextScore]:  # fmt: skip
    """Score each document on its own (it starts with bos unless add_bos is False)."""
    out = []
    for doc in documents:
        ids = tokenizer.encode(doc.text, add_special_tokens=add_bos)
        if len(ids) < 2:
            raise ValueError(f"{doc.name}: the text encodes to {len(ids)} token(s); at least 2 are needed")
        lp = score_ids(scorer, ids, context_length, stride, batch)
        out.append(TextScore(doc.name, len(ids) - 1, len(doc.text.encode("utf-8")), lp))
    return out


def combined(name: str, scores: Sequence[TextScore]) -> TextScore:
    """Several documents as one figure: their log-likelihoods, tokens and bytes added up."""
    return TextScore(name, sum(s.tokens for s in scores), sum(s.bytes for s in scores),
                     math.fsum(s.logprob for s in scores))  # fmt: skip
