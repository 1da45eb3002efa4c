"""SentencePiece `tokenizer.model` without the sentencepiece package: a small protobuf wire-format reader for the
ModelProto, and its rebuild as an equivalent `tokenizers` BPE (byte fallback, "▁" for spaces plus a dummy prefix,
merges ranked by piece score)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

# SentencePiece.Type enum values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.ModelType


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that tokenisation depends on."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char (proto default: unigram)
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    precompiled_charsmap: bytes = b""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]  # IndexError on truncation, reported by the caller
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value, pos = _read_varint(buf, pos)
            yield number, value
            continue
        if wire_type == 2:  # length-delimited: strings, bytes, sub-messages
            size, pos = _read_varint(buf, pos)
        elif wire_type in (1, 5):  # fixed 64 / fixed 32
            size = 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} for field {number}")
        yield number, buf[pos : pos + size]
        pos += size
    if pos != len(buf):
        raise ValueError("message is truncated")


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32 are sign-extended varints


def read_sentencepiece_model(path: str | os.PathLike[str]) -> SentencePieceModel:
    """Parse a SentencePiece `.model` file (ModelProto) without the sentencepiece package."""
    pieces: list[tuple[str, float, int]] = []
    spec: dict[str, Any] = {}
    try:
        for number, value in _fields(Path(path).read_bytes()):
            if number == 1 and isinstance(value, bytes):  # repeated SentencePiece
                piece = dict(_fields(value))
                score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                pieces.append((bytes(piece.get(1, b"")).decode("utf-8"), score, int(piece.get(3, _NORMAL))))
            elif number == 2 and isinstance(value, bytes):  # TrainerSpec
                trainer = dict(_fields(value))
                spec["model_type"] = int(trainer.get(3, 1))
                spec["byte_fallback"] = bool(trainer.get(35, 0))
                if trainer.get(24, 0):
                    raise ValueError("trainer_spec.treat_whitespace_as_suffix is not supported")
                for name, number_ in (("unk_id", 40), ("bos_id", 41), ("eos_id", 42), ("pad_id", 43)):
                    if number_ in trainer:
                        spec[name] = _int32(int(trainer[number_]))
            elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
                normalizer = dict(_fields(value))
                spec["add_dummy_prefix"] = bool(normalizer.get(3, 1))
                spec["remove_extra_whitespaces"] = bool(normalizer.get(4, 1))
                spec["precompiled_charsmap"] = bytes(normalizer.get(2, b""))
    except (IndexError, KeyError, UnicodeDecodeError, struct.error, ValueError) as exc:
        raise ValueError(f"{path}: not a readable SentencePiece model ({exc})") from exc
    if not pieces:
        raise ValueError(f"{path}: SentencePiece model has no pieces")
    return SentencePieceModel(pieces=pieces, **spec)


def _backend_from_sentencepiece(sp: SentencePieceModel, path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """Rebuild a SentencePiece BPE model as a `tokenizers` BPE that encodes and decodes identically."""
    if sp.model_type != _BPE:
        raise ValueError(f"{path}: trainer_spec.model_type={sp.model_type}, only BPE (2) is supported")
    if sp.precompiled_charsmap or sp.remove_extra_whitespaces:
        raise ValueError(
            f"{path}: normalizer_spec needs an identity normalizer without remove_extra_whitespaces "
            "(the Llama/Mistral setting); this model asks for more"
        )
    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    mergeable = {piece: (score, i) for i, (piece, score, kind) in enumerate(sp.pieces) if kind == _NORMAL}
    # SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is the best-scoring piece.
    # That is a BPE merge list: every split of every normal piece into two normal pieces, ranked by the
    # joined piece's score (then its id, then the left part's id, for a total order).
    ranked = []
    for piece, (score, piece_id) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, piece_id, vocab[left], left, right))
    ranked.sort()
    unk = sp.pieces[sp.unk_id][0] if 0 <= sp.unk_id < len(sp.pieces) else None
    bpe = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=sp.byte_fallback,
    )
    backend = tokenizers.Tokenizer(bpe)
    # The dummy prefix "▁" is a normalizer step, so (as in Mistral's own tokenizer.json) every text segment
    # gets one, also the segment right after a special token. tokenizers' Metaspace(prepend_scheme="first")
    # would avoid that, but it drops the prefix before a leading space, which SentencePiece keeps.
    steps = [normalizers.Prepend("▁")] if sp.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if sp.add_dummy_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    # Control and unknown pieces become special added tokens; user-defined pieces are matched whole.
    backend.add_tokens(
        [
            AddedToken(piece, special=kind != _USER_DEFINED, normalized=False)
            for piece, _, kind in sp.pieces
            if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)
        ]
    )
    return backend
