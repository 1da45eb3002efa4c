"""PEFT's adapter_config.json, read and written: which fields we honour, and which values we refuse.

A PEFT LoRA folder holds adapter_config.json and adapter_model.safetensors (keys
base_model.model.<module path>.lora_A.weight / .lora_B.weight; lora.py builds them). PEFT writes every field of
its LoraConfig; a field we do not implement is accepted only at its neutral value, so an adapter that needs
DoRA, bias training or per-module ranks is refused by name instead of being loaded wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Model class name -> PEFT task_type; a bare backbone has none.
TASK_TYPES = {"Zamba2ForCausalLM": "CAUSAL_LM", "Zamba2ForSequenceClassification": "SEQ_CLS"}

# Fields that change the adapter's math or layout, with the only values we implement (None = unset).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "megatron_config": (None,),
}


def settings_to_config(settings, task_type: str | None, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json dict PEFT reads for this LoRA (a `LoraSettings` from lora.py)."""
    targets = settings.targets if isinstance(settings.targets, str) else list(settings.targets)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "exclude_modules": list(settings.exclude) or None,
        "modules_to_save": list(settings.modules_to_save) or None,
        "use_rslora": settings.use_rslora,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (an adapter is a folder with {CONFIG_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def config_to_settings(cfg: dict[str, Any], path: Path, settings_cls):
    """A `settings_cls` (lora.LoraSettings) from a PEFT config dict; unsupported values are errors naming
    the field."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f'{path}: peft_type is {cfg.get("peft_type")!r}; only LoRA adapters ("LORA") load here')
    for name, allowed in _NEUTRAL.items():
        if name in cfg and cfg[name] not in allowed:
            raise ValueError(f"{path}: {name} = {cfg[name]!r} is not supported (expected {allowed[0]!r})")

    def field(name: str, kind, required: bool = True, default=None):
        if name not in cfg or cfg[name] is None:
            if required:
                raise ValueError(f"{path}: missing field {name!r}")
            return default
        value = cfg[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"{path}: {name} must be {_kind_name(kind)}, got {value!r}")
        return value

    r = field("r", int)
    alpha = field("lora_alpha", (int, float))
    if r < 1:
        raise ValueError(f"{path}: r must be >= 1, got {r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha must be finite, got {alpha}")
    targets = field("target_modules", (list, str))
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of names or a regex string, got {targets!r}")
    exclude = field("exclude_modules", (list, str), required=False, default=[])
    if isinstance(exclude, str):
        exclude = [exclude]
    to_save = field("modules_to_save", list, required=False, default=[])
    return settings_cls(
        r=r,
        alpha=alpha,
        targets=targets,
        dropout=float(field("lora_dropout", (int, float), required=False, default=0.0)),
        modules_to_save=[str(m) for m in to_save],
        exclude=[str(m) for m in exclude],
        use_rslora=bool(field("use_rslora", bool, required=False, default=False)),
    )


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", list: "a list", str: "a string", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_task_type(cfg: dict[str, Any], model_class: str, path: Path) -> None:
    """A SEQ_CLS adapter into a causal LM (or the reverse) is refused; an unset task_type loads anywhere."""
    task = cfg.get("task_type")
    expected = TASK_TYPES.get(model_class)
    if task is not None and expected is not None and task != expected:
        raise ValueError(f"{path}: task_type is {task!r}, but the model is a {model_class} ({expected})")
