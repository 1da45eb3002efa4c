"""Packed rows: several documents in one row of a batch, each computed exactly as if it were alone.

The convention (the one transformers' padding-free collators use): `position_ids` restart at 0 at every document
start, and the labels hold -100 at each document's first token so that no document predicts the next one's first
token. From the positions the backbone derives once per forward a document index `seq_idx` (B, T), which the
Mamba2 conv and scan (zamba2/ops/conv.py, zamba2/ops/ssd.py) and the attention mask (block-diagonal causal) use
to keep documents apart.
"""

from __future__ import annotations

import torch


def packed_documents(position_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Document index (B, T) long, counting from 0 in every row, or None when no row holds more than one document.

    position_ids (B, T); mask (B, T) with 0 at padding, or None. A document starts where the position is 0 on a
    real token that follows another real token of the row, so the positions of a left-padded batch (padding at 0,
    or at 1 as transformers writes them, then 0 at the first real token) are not mistaken for packing.
    """
    starts = position_ids[:, 1:] == 0  # (B, T-1): a document would start at t
    if mask is not None:
        real = mask.to(torch.bool)
        seen = real.cumsum(-1) > 0  # a real token at or before t
        starts &= real[:, 1:] & seen[:, :-1]
    if not bool(starts.any()):
        return None
    first = torch.zeros_like(position_ids[:, :1], dtype=torch.long)
    return torch.cat([first, starts.cumsum(-1)], dim=1)


def document_spans(seq_idx_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in a (T,) document index: the documents of one packed row."""
    values = seq_idx_row.tolist()
    starts = [0] + [t for t in range(1, len(values)) if values[t] != values[t - 1]]
    return list(zip(starts, starts[1:] + [len(values)], strict=True))
