"""Loading: build the model on the meta device, then fill it from the safetensors files tensor by tensor.

Each tensor is read from the memory map, converted to the target dtype/device and assigned, one at a time
(see zamba2/checkpoint/files.py for how the map is kept small); names are matched by zamba2/checkpoint/keys.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from zamba2 import quant
from zamba2.checkpoint.files import (
    CONFIG_NAME,
    WeightFiles,
    _apply_overrides,
    _open,
    _read_config_dict,
    find_weight_files,
    iter_tensors,
    read_headers,
    resolve_dtype,
    resolve_model_dir,
)
from zamba2.checkpoint.keys import KeyPlan, plan_keys
from zamba2.config import Zamba2Config
from zamba2.generation_config import GenerationConfig

logger = logging.getLogger("zamba2.checkpoint")


# ---- loading -------------------------------------------------------------------------------------


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor


def _target_dtypes(
    model: nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.dtype]:
    """Floating parameters take the requested dtype; buffers (e.g. quantised codes and their fp32 scales)
    and integer tensors keep the dtype the model registered them with."""
    params = {name for name, _ in model.named_parameters()}
    return {k: dtype if k in params and t.is_floating_point() else t.dtype for k, t in expected.items()}


def _read_one(files: WeightFiles, key: str) -> torch.Tensor:
    with _open(files.key_to_file[key]) as f:
        return f.get_tensor(key)


def _check_copies(files: WeightFiles, plan: KeyPlan, config: Zamba2Config) -> None:
    """Each repeated shared block (and a tied lm_head stored anyway) must equal the tensor that is loaded."""
    for ours, dup in plan.copies:
        src = plan.sources[ours]
        a, b = _read_one(files, src), _read_one(files, dup)
        if a.shape != b.shape or not torch.equal(a, b):
            if dup.startswith("lm_head."):
                raise ValueError(
                    f"{files.source}: {dup!r} differs from {src!r} but config.json sets "
                    "tie_word_embeddings=true; set it to false to use a separate output head"
                )
            raise ValueError(
                f"{files.source}: shared block copies differ: {dup!r} != {src!r}. Hybrid layers that share "
                f"a block (num_mem_blocks={config.num_mem_blocks}) must hold identical weights; this "
                "checkpoint changed the copies separately, which tied shared blocks cannot represent"
            )


def load_state_into(
    model: nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = True,
    legacy_config: bool | None = None,
) -> None:
    """Fill a (meta-built) model from the safetensors in `folder`, converting each tensor on the fly.

    Raises with the folder/file and key for missing, unexpected, mis-shaped or inconsistent tensors.
    Afterwards no parameter or buffer is left on the meta device.
    """
    folder = Path(folder)
    device = torch.device(device)
    config = model.config
    files = find_weight_files(folder, legacy_config)
    plan = plan_keys(files, model, config, folder)

    expected = model.state_dict()
    targets = _target_dtypes(model, expected, dtype)
    headers = read_headers(files, sorted(set(plan.sources.values())))
    for ours, src in plan.sources.items():
        want, (found, file_dtype) = tuple(expected[ours].shape), headers[src]
        path = files.key_to_file[src]
        if want != found:
            raise ValueError(
                f"{path}: tensor {src!r} has shape {list(found)} but the model expects "
                f"{list(want)} for {ours!r}; does config.json match these weights?"
            )
        if not targets[ours].is_floating_point and file_dtype != targets[ours]:
            raise ValueError(f"{path}: tensor {src!r} is {file_dtype} but the model expects {targets[ours]}")
    _check_copies(files, plan, config)

    by_source = {src: ours for ours, src in plan.sources.items()}
    bar = tqdm(total=len(by_source), desc=f"Loading {folder.name}", unit="tensor", disable=not progress)
    with torch.no_grad():
        for src, t in iter_tensors(files, list(by_source)):
            ours = by_source[src]
            # A private copy (never a view of the memory map), converted on the way.
            _assign(model, ours, t.to(device=device, dtype=targets[ours], copy=True))
            bar.update(1)
    bar.close()

    for key in sorted(set(expected) - set(plan.sources)):
        if key.startswith("score."):
            logger.warning(
                "%s: %s is not in the checkpoint and was initialised randomly; train it before use",
                folder,
                key,
            )
            weight = torch.empty(expected[key].shape, dtype=dtype, device=device)
            _assign(model, key, weight.normal_(0.0, config.initializer_range))
    if "lm_head.weight" in expected and config.tie_word_embeddings:  # (a quantised lm_head is not tied)
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{folder}: tensors left uninitialised after loading: {', '.join(left[:10])}")


_SPREAD = ("balanced", "balanced_low_0", "sequential")
_TP_HINT = (
    "zamba2 loads the whole model onto one device; for several GPUs use tensor-parallel inference "
    "(torchrun --nproc-per-node N -m zamba2 generate --tp N, zamba2.train.distributed)"
)


def _as_device(value: Any) -> torch.device:
    """One device_map value: an int N (cuda:N), a device name or a torch.device."""
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if isinstance(value, (str, torch.device)):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(
        f"device_map value {value!r} is not a device; expected 'auto', 'cpu', 'cuda', 'cuda:N', an int, "
        "a torch.device, or a dict whose values are one device"
    )


def resolve_device(device: str | torch.device | None, device_map: Any = None) -> torch.device:
    """The one device to load onto, from `device` or transformers' `device_map`.

    device_map: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N", an int N (cuda:N), a torch.device,
    or a dict whose values are all one device ({"": "cuda:0"}). A map over several devices is an error that points
    to the tensor-parallel path; "balanced" / "sequential" are "auto" when at most one GPU is visible.
    """
    if device_map is None:
        return torch.device("cpu" if device is None else device)
    if isinstance(device_map, dict):
        targets = {_as_device(v) for v in device_map.values()}
        if len(targets) != 1:
            names = ", ".join(sorted(map(str, targets))) or "none"
            raise ValueError(f"device_map places the model on several devices ({names}); {_TP_HINT}")
        target = targets.pop()
    elif device_map in _SPREAD or device_map == "auto":
        if device_map != "auto" and torch.cuda.device_count() > 1:
            count = torch.cuda.device_count()
            raise ValueError(f"device_map={device_map!r} spreads the model over {count} GPUs; {_TP_HINT}")
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        target = _as_device(device_map)
    if device is not None and torch.device(device) != target:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return target


def load_pretrained(
    cls: type[nn.Module],
    path_or_id: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    torch_dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    quantize: str | None = None,
    quantize_group_size: int = 64,
    progress: bool = True,
    config: Zamba2Config | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """Build `cls` on the meta device from a folder or hub id and load its weights (eval mode).

    `config` replaces the folder's config.json; `config_overrides` (e.g. num_labels, id2label for a
    classifier) are applied on top of either. `device_map` (see resolve_device) and `torch_dtype` (the older
    name of `dtype`) are transformers' spellings. The model's generation_config comes from
    generation_config.json (zamba2/generation_config.py).
    """
    target_device = resolve_device(device, device_map)
    if torch_dtype is not None:
        if dtype != "auto" and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is the older "
                             "name of dtype: pass one")  # fmt: skip
        dtype = torch_dtype
    if quantize is not None and quantize not in quant.MODES:
        raise ValueError(f"quantize={quantize!r}; expected None or one of {', '.join(quant.MODES)}")
    folder = resolve_model_dir(path_or_id, revision=revision, cache_dir=cache_dir, token=token)
    legacy = None
    if config is None:
        data, legacy = _read_config_dict(folder)
        data = _apply_overrides(data, config_overrides or {})
        try:
            config = Zamba2Config.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{folder / CONFIG_NAME}: {err}") from err
    elif config_overrides:
        config = Zamba2Config.from_dict(_apply_overrides(config.to_dict(), config_overrides))
    target = resolve_dtype(dtype, config)
    stored_quantization = config.extras.get("quantization_config")
    if stored_quantization is not None and quantize is not None:
        raise ValueError(f"{folder}: the checkpoint is already quantised; load it with quantize=None")
    with torch.device("meta"):
        model = cls(config)
    if stored_quantization is not None:  # a checkpoint saved after quantize_model: rebuild its shells first
        try:
            quant.apply_quantization_config(model, stored_quantization)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{folder / CONFIG_NAME}: {err}") from err
    load_state_into(model, folder, target, target_device, progress=progress, legacy_config=legacy)
    if hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(folder, config)
    if quantize is not None:
        # Quantised after loading, one layer at a time; recorded so that save_pretrained persists it.
        model.quantize(quantize, group_size=quantize_group_size, progress=progress)
    return model.eval()

