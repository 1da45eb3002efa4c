"""The checkpoint's tokenizer: loading, bos/eos handling, batching, chat template, streaming text.

`Tokenizer.from_pretrained(folder)` prefers `tokenizer.json` (read by the `tokenizers` library). A folder
with only a SentencePiece `tokenizer.model` (Mistral v0.1 / Llama style BPE) is converted here, without the
`sentencepiece` package: the ModelProto is read with a small protobuf wire-format reader and rebuilt as an
equivalent `tokenizers` BPE (byte fallback, "▁" for spaces plus a dummy prefix, merges ranked by piece
score). Plain text encodes and decodes exactly as SentencePiece does. Like transformers, special-token
strings in the text (e.g. "<s>", "<|im_start|>") encode as the special token, which chat templates rely on.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, normalizers, processors

__all__ = ["SentencePieceModel", "StreamDecoder", "Tokenizer", "read_sentencepiece_model"]

_REPLACEMENT_CHAR = "\ufffd"
_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# --- SentencePiece ModelProto ------------------------------------------------------------------------------

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


# --- config files ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, where: str) -> str | None:
    """A special-token entry is a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a string or {{'content': str}}, got {value!r}")


def _chat_template_from_config(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{where}: chat_template must be a string or a list with a 'default' entry")


def _raise_from_template(message: str) -> None:
    raise _TemplateRaised(message)


class _TemplateRaised(Exception):
    """raise_exception(...) called by a chat template."""


# --- Tokenizer ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for a checkpoint, plus its chat template. Knows nothing about the model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        source: str = "<in memory>",
    ) -> None:
        self.backend = backend
        self.source = source  # the folder it came from, named in error messages
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self._token_id("bos_token", bos_token)
        self.eos_token_id = self._token_id("eos_token", eos_token)
        self.unk_token_id = self._token_id("unk_token", unk_token)
        self.pad_token_id = self._token_id("pad_token", pad_token)
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(f"{source}: add_bos_token is true but there is no bos_token")
        if add_eos_token and self.eos_token_id is None:
            raise ValueError(f"{source}: add_eos_token is true but there is no eos_token")
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, token in added.items() if token.special)
        self._template: Template | None = None  # compiled on first use

    def _token_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load from a folder with tokenizer.json (preferred) or tokenizer.model, plus the optional
        tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
        root = Path(folder)
        config_path = root / "tokenizer_config.json"
        # tokenizer_config.json wins; special_tokens_map.json fills in what it lacks.
        config = {**_read_json(root / "special_tokens_map.json"), **_read_json(config_path)}
        if (root / "tokenizer.json").is_file():
            backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
            names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
            defaults = {key: name for key, name in names.items() if backend.token_to_id(name) is not None}
        elif (root / "tokenizer.model").is_file():
            sp = read_sentencepiece_model(root / "tokenizer.model")
            backend = _backend_from_sentencepiece(sp, root / "tokenizer.model")
            ids = dict(zip(_TOKEN_KEYS, (sp.bos_id, sp.eos_id, sp.unk_id, sp.pad_id), strict=True))
            defaults = {key: sp.pieces[i][0] for key, i in ids.items() if 0 <= i < len(sp.pieces)}
            _add_config_tokens(backend, config, config_path)
        else:
            raise FileNotFoundError(f"{root}: no tokenizer.json or tokenizer.model in this folder")
        tokens = {
            key: _token_content(config.get(key, defaults.get(key)), f"{config_path}: {key}")
            for key in _TOKEN_KEYS
        }
        flags = {
            "add_bos_token": config.get("add_bos_token", True),
            "add_eos_token": config.get("add_eos_token", False),
        }
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{config_path}: {key} must be true or false, got {value!r}")
        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _chat_template_from_config(
                config.get("chat_template"), f"{config_path}: chat_template"
            )
        return cls(backend, **tokens, **flags, chat_template=template, source=str(root))

    # --- encoding / decoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _with_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.add_bos_token:
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        if add_special_tokens and self.add_eos_token:
            ids = [*ids, self.eos_token_id]  # type: ignore[list-item]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; bos/eos are added per add_bos_token/add_eos_token when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        # The backend's own post-processor is bypassed so tokenizer_config.json alone decides bos/eos.
        return self._with_special(self.backend.encode(text, add_special_tokens=False).ids, add_special_tokens)

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids, size = [int(i) for i in ids], self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {size})")
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text for a sequence of ids (a list or a 1-D tensor)."""
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        """decode() for each row of a list of id lists or a (B, T) tensor."""
        rows = [self._check_ids(row) for row in batch]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __call__(
        self, texts: str | Sequence[str], add_special_tokens: bool = True, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """Encode a batch into padded int64 tensors {"input_ids": (B, T), "attention_mask": (B, T)}.

        Left padding (the default) keeps every row's last token in the last column, as generation wants.
        Pads with pad_token, else eos_token, else unk_token.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise ValueError("texts must be a string or a non-empty sequence of strings")
        pad_id = next(
            (i for i in (self.pad_token_id, self.eos_token_id, self.unk_token_id) if i is not None), 0
        )
        rows = [
            self._with_special(e.ids, add_special_tokens)
            for e in self.backend.encode_batch(batch, add_special_tokens=False)
        ]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[b, cols] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json so that from_pretrained (or transformers)
        reloads the same tokenizer."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        # Other readers of tokenizer.json add bos/eos through the post-processor: make it match ours.
        bos = [self.bos_token] if self.add_bos_token else []
        eos = [self.eos_token] if self.add_eos_token else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
            special_tokens=[(token, backend.token_to_id(token)) for token in {*bos, *eos}],
        )
        backend.save(str(root / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        }
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # --- chat ----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template.

        Returns the prompt text, or its ids (without extra bos/eos: the template places those) when
        `tokenize` is true. The template runs in jinja2's immutable sandbox.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat_template (tokenizer_config.json)")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{index}] must be a mapping with a string 'role', got {message!r}")
        try:
            if self._template is None:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_from_template
                env.filters["tojson"] = lambda value, indent=None: json.dumps(
                    value, ensure_ascii=False, indent=indent
                )
                self._template = env.from_string(self.chat_template)
            text = self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except _TemplateRaised as exc:
            raise ValueError(f"{self.source}: chat_template rejected the messages: {exc}") from exc
        except TemplateError as exc:  # syntax errors, undefined names, sandbox SecurityError
            raise ValueError(f"{self.source}: chat_template failed: {type(exc).__name__}: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _add_config_tokens(backend: tokenizers.Tokenizer, config: dict[str, Any], where: Path) -> None:
    """Add tokenizer_config.json's added_tokens_decoder entries (e.g. <|im_start|>) missing from a .model."""
    entries = config.get("added_tokens_decoder") or {}
    for key in sorted(entries, key=int):
        entry = entries[key]
        content = _token_content(entry, f"{where}: added_tokens_decoder[{key}]")
        if content is None or backend.token_to_id(content) is not None:
            continue
        if int(key) != backend.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"{where}: added_tokens_decoder[{key}] {content!r} does not extend the vocabulary"
            )
        backend.add_tokens([AddedToken(content, special=bool(entry.get("special", True)), normalized=False)])


# --- streaming ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turn generated ids into text as they arrive: push(id) returns only newly completed text.

    It decodes a short window of ids (the last emitted chunk plus what is pending) and emits the part
    past the window's previous text, so SentencePiece word-boundary spaces come out right. While the
    window's text ends in U+FFFD it holds back: a multi-byte character is still arriving as byte-fallback
    tokens. For ids that decode to valid UTF-8, the concatenated output equals
    `tokenizer.decode(all_ids, skip_special_tokens)`. `max_pending` bounds the hold (a character needs
    at most 4 byte tokens) so invalid byte sequences cannot stall the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, max_pending: int = 8) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        self._ids: list[int] = []  # the window: the last emitted chunk, then the pending ids
        self._read = 0  # ids before this index have been emitted

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
