"""Training data: read documents, tokenise them once, and cut them into rows.

Inputs, told apart by their path:
    a .txt file / a folder of .txt files    one document per file (causal LM)
    .jsonl with "text"                       one document per line (causal LM)
    .jsonl with "messages"                   chat: rendered with the tokenizer's chat template; the loss is on
                                             the assistant turns only
    .jsonl / .csv with "text" and "label"    sequence classification, one sample per line

Causal LM documents are packed: every document gets bos ... eos, the documents are laid end to end, and the
stream is cut into rows of `seq_len` tokens. `position_ids` restart at 0 at every document start (inside a row
the model then keeps documents apart: see Zamba2Model.forward) and a document's first token is never a
target of the document before it (label -100). The tokenised stream is cached next to the run (a safetensors
file keyed by the inputs and the tokenizer), so a resumed or repeated run does not tokenise again.

A `Rows` object is the dataset: `rows.batch(indices)` gives the tensors of those rows; the order they are
visited in (shuffled per epoch, seeded) is the loop's business.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zamba2.jsonl import objects

IGNORE = -100


class DataError(ValueError):
    """Bad training data; the message names the file (and line)."""


# ---- reading -------------------------------------------------------------------------------------


@dataclass
class Sample:
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    label: Any = None
    where: str = ""  # "file:line", named in errors


def _objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """zamba2.jsonl.objects, its errors as DataError (what `zamba2 train` reports as bad data)."""
    try:
        yield from objects(path)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def read_samples(path: str | Path, task: str = "causal-lm") -> list[Sample]:
    """Every sample of a file or folder, checked for the fields `task` needs."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    classify = task == "sequence-classification"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no .txt files")
        if classify:
            raise DataError(f"{path}: sequence classification needs a .jsonl or .csv file with text and label")
        samples = [Sample(text=p.read_text(encoding="utf-8"), where=str(p)) for p in files]
    elif path.suffix == ".jsonl":
        samples = []
        for where, obj in _objects(path):
            if classify:
                if "text" not in obj or "label" not in obj:
                    raise DataError(f"{where}: a classification line needs 'text' and 'label'")
                samples.append(Sample(text=_string(obj["text"], where, "text"), label=obj["label"], where=where))
            elif "messages" in obj:
                samples.append(Sample(messages=_messages(obj["messages"], where), where=where))
            elif "text" in obj:
                samples.append(Sample(text=_string(obj["text"], where, "text"), where=where))
            else:
                raise DataError(f"{where}: expected a 'text' or a 'messages' field")
    elif path.suffix == ".csv":
        if not classify:
            raise DataError(f"{path}: CSV data is for --task sequence-classification (columns text, label)")
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise DataError(f"{path}:1: the header must name the columns 'text' and 'label'")
            samples = [
                Sample(text=row["text"], label=row["label"], where=f"{path}:{n}") for n, row in enumerate(reader, 2)
            ]
    else:
        if classify:
            raise DataError(f"{path}: sequence classification needs a .jsonl or .csv file")
        samples = [Sample(text=path.read_text(encoding="utf-8"), where=str(path))]
    samples = [s for s in samples if s.messages is not None or classify or (s.text or "").strip()]
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    return samples


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    return value


# ---- tokenising ----------------------------------------------------------------------------------


def _chat_tokens(tok, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation and their labels: the token itself inside assistant turns, else -100.

    Each assistant turn's text is the part of the rendering of messages[:i+1] that follows the rendering of
    messages[:i] with the generation prompt; the template must render prefixes consistently for that to hold.
    """
    try:
        full = tok.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            upto = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(f"{where}: the chat template does not render conversation prefixes consistently")
            spans.append((len(before), len(upto)))
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: {exc}") from None
    enc = tok.backend.encode(full, add_special_tokens=False)
    labels = [IGNORE] * len(enc.ids)
    for k, (i, (a, b)) in enumerate(zip(enc.ids, enc.offsets, strict=True)):
        if any(lo <= a and b <= hi and b > a for lo, hi in spans):
            labels[k] = i
    if all(x == IGNORE for x in labels):
        raise DataError(f"{where}: the assistant turns rendered to no tokens")
    return list(enc.ids), labels


def tokenize_documents(tok, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed stream: ids (N,), labels (N,) and doc_starts (D,) offsets; every document bos ... eos."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    texts = [s.text for s in samples if s.messages is None]
    encoded = iter(tok.backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for s in samples:
        if s.messages is not None:
            doc, lab = _chat_tokens(tok, s.messages, s.where)
            doc, lab = bos + doc + eos, [IGNORE] * len(bos) + lab + eos
        else:
            doc = bos + list(next(encoded).ids) + eos
            lab = list(doc)
        lab[0] = IGNORE  # the previous document's last token does not predict this one's first
        starts.append(len(ids))
        ids += doc
        labels += lab
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32), torch.tensor(starts)


def _fingerprint(paths: Sequence[Path], tok, task: str) -> str:
    h = hashlib.sha256(f"v1|{task}|".encode())
    h.update(tok.backend.to_str().encode())
    h.update(f"{tok.bos_token_id}|{tok.eos_token_id}|{tok.chat_template}".encode())
    for p in paths:
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


# ---- rows ----------------------------------------------------------------------------------------


class Rows:
    """Fixed-length rows over a packed token stream (causal LM)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, doc_starts: torch.Tensor, seq_len: int) -> None:
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        n = ids.numel() // seq_len
        if n == 0:
            raise DataError(f"the data has {ids.numel()} tokens, fewer than one row of --seq-len {seq_len}")
        self.ids = ids[: n * seq_len].view(n, seq_len)
        self.labels = labels[: n * seq_len].view(n, seq_len)
        # position of each token inside its document, restarting at every document start
        start = torch.zeros(ids.numel(), dtype=torch.long)
        start[doc_starts] = doc_starts
        pos = torch.arange(ids.numel()) - start.cummax(0).values
        self.positions = pos[: n * seq_len].view(n, seq_len)
        self.tokens = int((self.labels[:, 1:] != IGNORE).sum())  # targets in the data

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        pos = self.positions[idx]
        # a row starting mid-document starts its positions at 0 (each row is its own sequence)
        first = pos[:, :1].clone()
        in_first_doc = (torch.arange(self.seq_len)[None] < _first_reset(pos)[:, None])
        pos = torch.where(in_first_doc, pos - first, pos)
        return {"input_ids": self.ids[idx].long(), "labels": self.labels[idx].long(), "position_ids": pos}


def _first_reset(pos: torch.Tensor) -> torch.Tensor:
    """(B,) index of the first document start after column 0 (seq_len when there is none)."""
    T = pos.shape[1]
    resets = (pos[:, 1:] == 0).to(torch.long)
    has = resets.any(-1)
    first = resets.argmax(-1) + 1
    return torch.where(has, first, torch.full_like(first, T))


def causal_lm_rows(path: str | Path, tok, seq_len: int, cache_dir: Path | None = None) -> Rows:
    """Rows of `seq_len` tokens from a text file, folder or JSONL file, tokenised once (cached in cache_dir)."""
    path = Path(path)
    cached = None
    if cache_dir is not None and path.exists():
        cached = cache_dir / f"tokens-{_fingerprint([path], tok, 'causal-lm')}.safetensors"
        if cached.is_file():
            t = load_file(str(cached))
            return Rows(t["ids"], t["labels"], t["doc_starts"], seq_len)
    ids, labels, starts = tokenize_documents(tok, read_samples(path, "causal-lm"))
    if cached is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"ids": ids, "labels": labels, "doc_starts": starts}, str(cached))
    return Rows(ids, labels, starts, seq_len)


class Labelled:
    """Sequence-classification samples: one (truncated) row each, padded per batch on the right."""

    def __init__(self, path: str | Path, tok, seq_len: int, num_labels: int, label2id: dict | None = None) -> None:
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {seq_len}")
        samples = read_samples(path, "sequence-classification")
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.rows: list[list[int]] = []
        self.label_ids: list[int] = []
        for s, enc in zip(samples, tok.backend.encode_batch([s.text for s in samples], add_special_tokens=False),
                          strict=True):  # fmt: skip
            self.label_ids.append(_label_id(s.label, num_labels, label2id, s.where))
            ids = tok._with_special(list(enc.ids), True)[:seq_len]
            if not ids:
                raise DataError(f"{s.where}: the text is empty")
            self.rows.append(ids)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.rows[int(i)] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        labels = torch.tensor([self.label_ids[int(i)] for i in indices], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _label_id(label: Any, num_labels: int, label2id: dict | None, where: str) -> int:
    if isinstance(label, str) and label2id and label in label2id:
        return int(label2id[label])
    try:
        value = int(label)
        if isinstance(label, float) and label != value:
            raise ValueError
    except (TypeError, ValueError):
        known = f" or one of {sorted(label2id)}" if label2id else ""
        raise DataError(f"{where}: label {label!r} is not an integer{known}") from None
    if not 0 <= value < num_labels:
        raise DataError(f"{where}: label {value} is outside [0, {num_labels}) (--num-labels {num_labels})")
    return value
