"""Whole-model quantisation: replace a model's nn.Linear layers by QuantizedLinear, and describe / rebuild
them through config.json.

`quantization_config(...)` is the dict stored under "quantization_config" in config.json; it lists the
quantized modules so that `apply_quantization_config` can rebuild the same shells before loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from zamba2.quant.linear import QuantizedLinear
from zamba2.quant.schemes import MODES, check_group_size


def default_quantize_filter(name: str, module: nn.Module) -> bool:
    """Which nn.Linear layers `quantize_model` replaces by default.

    Both dimensions must be >= 256 (small projections save little bandwidth and lose more accuracy),
    and the layer must not be a LoRA adapter of the shared blocks (names containing "adapter_list");
    adapters stay in the model dtype. Linears carrying a fine-tuning LoRA (zamba2/train/lora.py) and its
    factors stay too: quantising the base alone would drop the adapter.
    """
    return (
        isinstance(module, nn.Linear)
        and module.in_features >= 256
        and module.out_features >= 256
        and "adapter_list" not in name
        and "lora_" not in name
        and not hasattr(module, "lora_A")
    )


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def quantize_model(
    model: nn.Module,
    mode: str,
    group_size: int = 64,
    include: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Replace selected nn.Linear layers of `model` by QuantizedLinear, in place, one at a time.

    `include(name, module)` selects layers (default: `default_quantize_filter`); `progress(name, done,
    total)` is called after each replacement. A Linear whose weight is an embedding's weight (tied
    lm_head) is quantised from that weight, which stays in the embedding untouched. A Linear reached
    under several names (a shared block) becomes one QuantizedLinear shared the same way.

    Returns stats: mode, group_size, quantized (count of distinct layers), skipped (distinct Linear
    layers left in float), modules (every name now holding a QuantizedLinear, aliases included), tied
    (names of tied layers), bytes_before (float weight bytes of the replaced layers) and bytes_after
    (their `weight_bytes()`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "int4":
        check_group_size(group_size)
    include = default_quantize_filter if include is None else include
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Names only: holding the modules themselves would keep every float weight alive until the end.
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    selected = [n for n in names if include(n, model.get_submodule(n))]
    # Same float Linear object -> same replacement. Keyed by id(): the original modules all stay alive
    # (still in the tree) until their last name is replaced, so an id cannot be reused meanwhile.
    replaced: dict[int, QuantizedLinear] = {}
    stats: dict[str, Any] = {
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "quantized": 0,
        "skipped": 0,
        "modules": [],
        "tied": [],
        "bytes_before": 0,
        "bytes_after": 0,
    }
    for i, name in enumerate(selected):
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):  # else: a shared parent was already updated through another name
            quantized = replaced.get(id(module))
            if quantized is None:
                quantized = QuantizedLinear.from_linear(module, mode, group_size)
                replaced[id(module)] = quantized
                stats["quantized"] += 1
                stats["bytes_before"] += module.weight.numel() * module.weight.element_size()
                stats["bytes_after"] += quantized.weight_bytes()
                if id(module.weight) in embedding_weights:
                    stats["tied"].append(name)
            parent_name, child = _split_name(name)
            setattr(model.get_submodule(parent_name), child, quantized)
        stats["modules"].append(name)
        del module  # the float weight can go now (unless an embedding or another name still holds it)
        if progress is not None:
            progress(name, i + 1, len(selected))
    stats["skipped"] = sum(isinstance(m, nn.Linear) for m in model.modules())  # distinct, left in float
    return stats


def quantization_config(mode: str, group_size: int = 64, modules: list[str] | None = None) -> dict[str, Any]:
    """The "quantization_config" entry of config.json describing a model quantised by this module."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "int4":
        check_group_size(group_size)
    return {
        "quant_method": "zamba2",
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "modules": sorted(modules or []),
    }


def apply_quantization_config(model: nn.Module, config: dict[str, Any]) -> None:
    """Swap the Linear layers named in `config["modules"]` for empty QuantizedLinear shells.

    Use it on a freshly built model before `load_state_dict` of a quantized checkpoint: no weights are
    quantised, the shells take the Linear's shape, device and (bias) dtype.
    """
    if config.get("quant_method") != "zamba2":
        raise ValueError(
            f"quantization_config.quant_method must be 'zamba2', got {config.get('quant_method')!r}"
        )
    mode = config.get("mode")
    group_size = config.get("group_size") or 64
    shells: dict[int, QuantizedLinear] = {}  # one shell per Linear object, so shared layers stay shared
    for name in config.get("modules", []):
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"quantization_config.modules names {name!r}, which the model does not have"
            ) from e
        if isinstance(linear, QuantizedLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"quantization_config.modules names {name!r}, a {type(linear).__name__}, not nn.Linear"
            )
        shell = shells.get(id(linear))
        if shell is None:
            shell = QuantizedLinear(
                linear.in_features,
                linear.out_features,
                mode,
                group_size,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            shells[id(linear)] = shell
        parent_name, child = _split_name(name)
        setattr(model.get_submodule(parent_name), child, shell)
