"""Saving: config.json, generation_config.json and safetensors weights under the published names, sharded
above a size limit, each file written atomically."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from zamba2.checkpoint.files import CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from zamba2.config import Zamba2Config
from zamba2.generation_config import GenerationConfig

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---- saving --------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200MB", "20KB", "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if m is None or m[2].upper() not in _UNITS or float(m[1]) <= 0:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '200MB', '20KB' or a byte count")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shard(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state_dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += _nbytes(t)
    return shards


def _write_atomic(path: Path, write) -> None:
    """Write a temporary file, then rename: a model still memory-mapping the old file keeps it intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share storage; a view of a bigger storage is copied out.
    return t.clone() if t.untyped_storage().nbytes() != _nbytes(t) else t


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> None:
    """Write config.json, generation_config.json and safetensors weights under the published names.

    One `model.safetensors`, or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` when the
    weights exceed `max_shard_size`. A tied lm_head is omitted (it is the embedding). Weight files from an
    earlier save that the new layout does not use are removed.
    """
    if not safe_serialization:
        raise ValueError("only safetensors are written (safe_serialization=False is not supported)")
    lora = [k for k in model.state_dict() if ".lora_A." in k]
    if lora:  # a checkpoint with adapter tensors in it would load nowhere (ours and transformers refuse the keys)
        raise ValueError(
            f"cannot save: the model carries LoRA adapters ({lora[0]}, ...): save them with "
            "zamba2.train.lora.save_adapter, or merge them in with merge_and_unload first (per-use adapters on "
            "a shared block serving several hybrid layers cannot merge)"
        )
    limit = parse_size(max_shard_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: Zamba2Config = model.config

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save: tensors on the meta device (not loaded): {', '.join(meta[:5])}")
    shards = _shard(state, limit)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for name, shard in zip(names, shards, strict=True):
        tensors = {k: _cpu_copy(t) for k, t in shard.items()}
        _write_atomic(folder / name, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
        del tensors
    index_path = folder / WEIGHTS_INDEX_NAME
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard},
        }
        _write_atomic(index_path, lambda p: p.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
    keep = {*names, WEIGHTS_INDEX_NAME} if len(shards) > 1 else {WEIGHTS_NAME}
    for old in folder.iterdir():
        ours = old.name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_NAME.fullmatch(old.name)
        if ours and old.name not in keep and old.is_file():
            old.unlink()

    data = config.to_dict()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    data["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in data:
        data["torch_dtype"] = data["dtype"]
    data["architectures"] = [type(model).__name__]
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / CONFIG_NAME, lambda p: p.write_text(text))
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    gen_text = json.dumps(generation.to_dict(), indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / GENERATION_CONFIG_NAME, lambda p: p.write_text(gen_text))
