"""tokenizer_config.json and special_tokens_map.json: reading them and the entries they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


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


def _call_settings(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The tokenizer call's defaults that tokenizer_config.json may set (transformers' names)."""
    out: dict[str, Any] = {}
    for key in ("padding_side", "truncation_side"):
        value = config.get(key)
        if value is not None:
            if value not in ("left", "right"):
                raise ValueError(f"{where}: {key} must be 'left' or 'right', got {value!r}")
            out[key] = value
    limit = config.get("model_max_length")
    if limit is not None:
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"{where}: model_max_length must be a positive number, got {limit!r}")
        out["model_max_length"] = int(limit)
    cleanup = config.get("clean_up_tokenization_spaces")
    if cleanup is not None:
        if not isinstance(cleanup, bool):
            raise ValueError(f"{where}: clean_up_tokenization_spaces must be true or false, got {cleanup!r}")
        out["clean_up_tokenization_spaces"] = cleanup
    return out
