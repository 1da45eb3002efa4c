"""Checkpoint files on disk: find a model folder (local or hub), read config.json, choose the safetensors files
that hold the weights, and read tensors from them.

Memory: tensors are read from a memory-mapped safetensors file one at a time. `iter_tensors` re-opens the file
every `_MAP_BUDGET` bytes so that pages already copied out are unmapped: peak RSS stays near one copy of the
weights in the target dtype.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open

from zamba2.config import Zamba2Config
from zamba2.legacy import convert_legacy_config, is_legacy_config, is_legacy_key

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_PATTERNS = [
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]  # fmt: skip
HUB_PATTERNS = [
    CONFIG_NAME, GENERATION_CONFIG_NAME, "*.safetensors", "*.safetensors.index.json", *TOKENIZER_PATTERNS,
]  # fmt: skip
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# Bytes read through one memory map before the file is re-opened (see the module docstring).
_MAP_BUDGET = 256 * 2**20

# Module-level reference so that tests can monkeypatch the download.
snapshot_download = huggingface_hub.snapshot_download

_CONVERT_SNIPPET = """\
    import torch; from safetensors.torch import save_file
    state = torch.load("{name}", map_location="cpu", weights_only=True)
    state = {{k: v.contiguous().clone() for k, v in state.items()}}
    save_file(state, "model.safetensors", metadata={{"format": "pt"}})"""


# ---- where the files are -------------------------------------------------------------------------


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return huggingface_hub.constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_dir(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    config_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    patterns: list[str] | None = None,
) -> Path:
    """A local folder as is; otherwise a hub id ("org/name") fetched with huggingface_hub.

    The hub path honours HF_HUB_OFFLINE and the local cache (a cached snapshot needs no network) and
    fetches only config, safetensors and tokenizer files (only the configs when `config_only`, only
    `patterns` when given: the tokenizer asks for TOKENIZER_PATTERNS).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model folder or a hub id like 'org/name'")
    name = str(path_or_id)
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"{name}: no such folder, and it does not look like a hub id ('org/name')")
    if patterns is None:
        patterns = [CONFIG_NAME, GENERATION_CONFIG_NAME] if config_only else HUB_PATTERNS
    try:
        folder = snapshot_download(
            name, revision=revision, allow_patterns=patterns, cache_dir=cache_dir, token=token,
            local_files_only=_offline(),
        )  # fmt: skip
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found, validation)
        where = f"{name}@{revision}" if revision else name
        hint = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if _offline() else ""
        raise OSError(
            f"{where}: not a local folder, and the hub could not provide it{hint}: "
            f"{type(err).__name__}: {err}"
        ) from err
    return Path(folder)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_config_dict(folder: Path) -> tuple[dict[str, Any], bool]:
    """config.json as a dict in our names, and whether it was in the legacy format."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; a model folder needs a config.json")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    model_type = data.get("model_type")
    if model_type != "zamba2":
        raise ValueError(f"{path}: model_type is {model_type!r}; expected 'zamba2'")
    if is_legacy_config(data):
        try:
            return convert_legacy_config(data), True
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    return data, False


def _apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    names = set(Zamba2Config.__dataclass_fields__) - {"extras"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"config override {unknown[0]!r} is not a Zamba2Config field")
    out = {**config, **overrides}
    # New labels: let the label fields follow the overridden ones instead of the stored ones.
    if "id2label" in overrides and "num_labels" not in overrides:
        out["num_labels"] = len(overrides["id2label"])
    if ("id2label" in overrides or "num_labels" in overrides) and "label2id" not in overrides:
        out.pop("label2id", None)
        if "id2label" not in overrides:
            out.pop("id2label", None)
    return out


def eos_token_ids(folder: str | os.PathLike, config_eos: int | list[int] | None, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id a checkpoint names, in order: config.json's, generation_config.json's and the
    tokenizer's (instruct models often name theirs only in one of the latter)."""
    path = Path(folder) / GENERATION_CONFIG_NAME
    generation = _read_json(path) if path.is_file() else {}
    ids: list[int] = []
    for value in (config_eos, generation.get("eos_token_id"), tokenizer.eos_token_id):
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def read_config(folder: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Zamba2Config:
    """Zamba2Config from `folder/config.json` (legacy configs converted transparently)."""
    folder = Path(folder)
    data, _ = _read_config_dict(folder)
    if overrides:
        data = _apply_overrides(data, overrides)
    try:
        return Zamba2Config.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from err


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype, config: Zamba2Config | None = None) -> torch.dtype:
    """torch.dtype from a dtype or its name; "auto" reads config.json's `dtype` / `torch_dtype`, else fp32."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating point type")
        return dtype
    if dtype == "auto":
        stored = None if config is None else config.extras.get("dtype") or config.extras.get("torch_dtype")
        if stored is None:
            return torch.float32
        if str(stored).removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"config.json dtype {stored!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[str(stored).removeprefix("torch.")]
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        choices = ", ".join(_DTYPES)
        raise ValueError(
            f"dtype {dtype!r} is not supported; expected 'auto', a torch dtype or one of {choices}"
        )
    return _DTYPES[name]


# ---- which files hold the weights ----------------------------------------------------------------


@dataclass
class WeightFiles:
    """The safetensors files of a checkpoint: tensor name -> file, and what chose them (for messages)."""

    key_to_file: dict[str, Path]
    source: Path  # model.safetensors or model.safetensors.index.json

    @property
    def is_legacy(self) -> bool:
        return any(is_legacy_key(k) for k in self.key_to_file)


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {err}") from err


def _read_index(index: Path) -> WeightFiles:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to file names")
    files: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{index}: shard {name!r} is outside the model folder")
        path = index.parent / name
        if not path.is_file():
            raise FileNotFoundError(f"{index} lists shard {name!r}, which is missing from {index.parent}")
        files[name] = path
    return WeightFiles({k: files[v] for k, v in weight_map.items()}, index)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); they are never unpickled here. "
            f"Convert them once to safetensors, e.g. in that folder:\n"
            + _CONVERT_SNIPPET.format(name=pickles[0])
        )


def find_weight_files(folder: str | os.PathLike, legacy_config: bool | None = None) -> WeightFiles:
    """Choose the weight files: `model.safetensors`, or the shards named by `model.safetensors.index.json`.

    Files are chosen by name and index, never by globbing. When both exist (a repository holding two
    layouts) the one whose tensor names match the config's format wins (`legacy_config`), else the single
    file, as transformers does.
    """
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    candidates = []
    if single.is_file():
        candidates.append(WeightFiles({k: single for k in _safetensors_keys(single)}, single))
    if index.is_file():
        candidates.append(_read_index(index))
    if not candidates:
        _refuse_pickles(folder)
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        found = f" (found {', '.join(others)}, but none named by an index)" if others else ""
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME}{found}")
    if legacy_config is not None:
        matching = [c for c in candidates if c.is_legacy == legacy_config]
        if matching:
            return matching[0]
    return candidates[0]


# ---- reading tensors -----------------------------------------------------------------------------


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {err}") from err


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_headers(
    files: WeightFiles, keys: list[str]
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """(shape, dtype) from the headers only; errors if the index names a tensor its shard does not hold."""
    headers: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files.key_to_file[k], []).append(k)
    for path, names in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for k in names:
                if k not in present:
                    raise ValueError(f"{files.source} places tensor {k!r} in {path.name}, which lacks it")
                info = f.get_slice(k)
                headers[k] = (tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype()))
    return headers


def iter_tensors(files: WeightFiles, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for `keys`, file by file, one tensor at a time.

    Tensors are views of the memory map: convert (copy) them before asking for the next one. The file is
    re-opened after `_MAP_BUDGET` bytes so that pages of tensors already copied leave the resident set.
    """
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files.key_to_file[k], []).append(k)
    for path, names in by_file.items():
        i = 0
        while i < len(names):
            mapped = 0
            with _open(path) as f:
                while i < len(names) and mapped < _MAP_BUDGET:
                    try:
                        t = f.get_tensor(names[i])
                    except SafetensorError as err:
                        raise ValueError(f"{path}: cannot read tensor {names[i]!r}: {err}") from err
                    mapped += t.numel() * t.element_size()
                    yield names[i], t
                    del t
                    i += 1
