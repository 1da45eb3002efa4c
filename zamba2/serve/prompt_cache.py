"""Prompt-state reuse: a bounded LRU of batch-1 cache snapshots keyed by the tokens they have consumed.

A hybrid model cannot rewind: the SSM state after tokens t_1..t_n mixes all of them, so a snapshot can only
serve a prompt that starts with exactly t_1..t_n. `lookup` returns the longest such snapshot that is a strict
prefix (at least one token is left to prefill, whose logits give the first new token), or the whole prompt
when the snapshot kept the logits after its last token (an identical prompt sent again needs no prefill at all).
In a multi-turn chat the previous turn's prompt, and its prompt + answer, are prefixes of the next turn's prompt.

Snapshots are looked up by hashing the new prompt's prefix at each length some snapshot has, so a lookup costs
one slice-and-hash per distinct stored length. The size bound counts tensor bytes (`HybridCache.memory_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from zamba2.cache import HybridCache


@dataclass
class Snapshot:
    tokens: tuple[int, ...]  # the token ids whose state this is
    cache: HybridCache  # batch 1, seq_len == len(tokens), never written after it is stored
    nbytes: int
    logits: torch.Tensor | None = None  # (V,) the model's logits after the last token, when kept


class PromptCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"prompt cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()  # oldest first
        self._lengths: dict[int, int] = {}  # stored token length -> number of entries with it
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0  # prompt tokens served from snapshots

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int] | tuple[int, ...]) -> Snapshot | None:
        """The longest stored snapshot whose tokens are a strict prefix of `prompt`, or all of it when the
        snapshot has its logits; counts a hit or a miss."""
        prompt = tuple(prompt)
        for n in sorted(self._lengths, reverse=True):
            if n > len(prompt):
                continue
            snap = self._entries.get(prompt[:n])
            if snap is not None and (n < len(prompt) or snap.logits is not None):
                self._entries.move_to_end(snap.tokens)
                self.hits += 1
                self.hit_tokens += n
                return snap
        self.misses += 1
        return None

    def put(self, tokens: list[int] | tuple[int, ...], cache: HybridCache, logits: torch.Tensor | None = None) -> bool:
        """Store a snapshot (the cache and logits are kept, not copied); evicts least recently used ones to fit."""
        tokens = tuple(tokens)
        if cache.batch_size != 1 or cache.seq_len != len(tokens) or not tokens:
            raise ValueError(
                f"a snapshot must be a batch-1 cache of exactly its tokens: batch {cache.batch_size}, "
                f"seq_len {cache.seq_len}, {len(tokens)} tokens"
            )
        nbytes = cache.memory_bytes() + (logits.numel() * logits.element_size() if logits is not None else 0)
        if nbytes > self.capacity_bytes:
            return False
        if tokens in self._entries:
            self._remove(tokens)
        while self.bytes + nbytes > self.capacity_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[tokens] = Snapshot(tokens, cache, nbytes, logits)
        self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
        self.bytes += nbytes
        return True

    def _remove(self, tokens: tuple[int, ...]) -> None:
        snap = self._entries.pop(tokens)
        self.bytes -= snap.nbytes
        self._lengths[len(tokens)] -= 1
        if self._lengths[len(tokens)] == 0:
            del self._lengths[len(tokens)]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.bytes = 0
