"""The tokenizer call's batch: truncation, padding and the returned mapping, in transformers' conventions.

`pad_batch` works on lists of ids only (special tokens already added), so it can be read and tested on its own:

    truncation  each row cut to `max_length` ids, from the right (or the left, truncation_side="left");
                `add_special_tokens` rows keep their bos/eos: only the text ids are cut
    padding     False: rows as they are; True / "longest": to the longest row; "max_length": to max_length;
                then up to a multiple of `pad_to_multiple_of`; pad ids go on `padding_side`

`BatchEncoding` is a dict (so `**batch` reaches `forward` and `generate`) with attribute access and `.to(device)`.
"""

from __future__ import annotations

from typing import Any

import torch

PADDING = (True, False, "longest", "max_length", "do_not_pad")
TRUNCATION = (True, False, "longest_first", "only_first", "do_not_truncate")
# transformers' stand-in for "no limit" in model_max_length; a tokenizer_config.json value past it means none.
NO_LIMIT = int(1e30)


class BatchEncoding(dict):
    """What the tokenizer call returns: {"input_ids": ..., "attention_mask": ...} plus `batch.input_ids` and
    `batch.to(device)` (tensors move, lists stay). It is a plain dict otherwise."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {', '.join(self)}") from None

    def to(self, device: str | torch.device, non_blocking: bool = False) -> BatchEncoding:
        """Move every tensor to `device` in place; returns self (as transformers does, for chaining)."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


def check_options(padding: Any, truncation: Any, return_tensors: str | None, side: str, trunc_side: str) -> None:
    """Raise ValueError naming the first option the call cannot honour."""
    if padding not in PADDING:
        raise ValueError(f"padding={padding!r}; expected one of {', '.join(map(repr, PADDING))}")
    if truncation is not None and truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; expected None or one of {', '.join(map(repr, TRUNCATION))}")
    if truncation == "only_second":
        raise ValueError("truncation='only_second' needs text pairs, which this tokenizer does not take")
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' (torch tensors) or None")
    for name, value in (("padding_side", side), ("truncation_side", trunc_side)):
        if value not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")


def truncate(text_ids: list[int], specials: tuple[list[int], list[int]], max_length: int, side: str) -> list[int]:
    """`prefix + text_ids + suffix` cut to `max_length` ids by dropping text ids from `side`."""
    prefix, suffix = specials
    keep = max_length - len(prefix) - len(suffix)
    if keep < 0:
        raise ValueError(f"max_length={max_length} leaves no room for the special tokens ({-keep} too many)")
    if len(text_ids) > keep:
        text_ids = text_ids[:keep] if side == "right" else text_ids[len(text_ids) - keep :]
    return [*prefix, *text_ids, *suffix]


def pad_batch(
    rows: list[list[int]],
    *,
    padding: bool | str,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    pad_id: int | None,
    side: str,
) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) rows after padding; unpadded rows when `padding` is off."""
    masks = [[1] * len(row) for row in rows]
    if padding in (False, "do_not_pad"):
        return rows, masks
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length= (or model_max_length in tokenizer_config.json)")
        width = max(max_length, *(len(row) for row in rows))  # rows longer than max_length are not cut here
    else:
        width = max(len(row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if pad_id is None and any(len(row) < width for row in rows):
        raise ValueError("padding needs a pad_token (or an eos_token / unk_token to pad with)")
    out_ids, out_mask = [], []
    for row, mask in zip(rows, masks, strict=True):
        fill = width - len(row)
        if side == "left":
            out_ids.append([pad_id] * fill + row)
            out_mask.append([0] * fill + mask)
        else:
            out_ids.append(row + [pad_id] * fill)
            out_mask.append(mask + [0] * fill)
    return out_ids, out_mask


def as_tensors(rows: list[list[int]], name: str) -> torch.Tensor:
    """(B, T) int64; ragged rows are an error that says how to pad them."""
    if len({len(row) for row in rows}) > 1:
        raise ValueError(
            f"return_tensors='pt' needs rows of one length, but {name} has rows of "
            f"{min(map(len, rows))} to {max(map(len, rows))} ids; pass padding=True (or truncation=True and "
            "max_length=)"
        )
    return torch.tensor(rows, dtype=torch.long)


# Spaces that word-level detokenisers left before punctuation and English contractions: what
# clean_up_tokenization_spaces=True removes, as plain substring replacements applied in this order.
_CLEAN_UP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def clean_up_tokenization_spaces(text: str) -> str:
    """Drop the space before `. ? ! ,` and before `n't 'm 's 've 're`; " ' " becomes "'"."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
