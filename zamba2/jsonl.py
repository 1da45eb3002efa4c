"""JSON Lines input, read the same way everywhere (training data, evaluation texts, multiple-choice items):
blank lines skipped, every other line one JSON object, errors naming the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def objects(path: str | Path, text: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each non-blank line of `path` (or of `text`, read from it already)."""
    path = Path(path)
    if text is None:
        text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj
