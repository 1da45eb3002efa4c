"""LoRA: low-rank adapters on chosen linears, laid out as PEFT lays them out on transformers' Zamba2.

A wrapped linear (lora_layers.py) computes  y = W x + b + (alpha / r) * B (A dropout(x)), B zero at first. The
base `weight` / `bias` keep their names in state_dict(); the factors add `<path>.lora_A.weight` / `.lora_B.weight`.

Per use on shared blocks: our tree registers each shared block once (blocks.HybridLayer), transformers' tree has
one tied copy per hybrid layer, and PEFT wraps each copy separately. So a linear inside a shared block gets one
(A, B) pair per hybrid ordinal ("slot") it serves, and the block passes its slot when calling it
(layers.attention.use_linear). Module paths are spoken in transformers' (PEFT's) view throughout: slot j's
adapter on q_proj is `model.layers.<hybrid_layer_ids[j]>.shared_transformer.self_attn.q_proj`, whichever
layer registers the block. `_uses` is the one place that maps our tree onto those paths.

Targets are matched like PEFT's `target_modules`: a list of names, each matching a module path equal to it or
ending in "." + it; a string is a regex that must match the whole path; "all-linear" is every linear but the
output head. The PEFT files (adapter_config.json + adapter_model.safetensors) live in peft_format.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zamba2.layers.blocks import HybridLayer, SharedBlock
from zamba2.layers.linear import Linear, is_plain
from zamba2.quant import QuantizedLinear
from zamba2.train import peft_format
from zamba2.train.lora_layers import LoraBase, LoraLinear, SlotLoraLinear

__all__ = [
    "DEFAULT_TARGETS", "LoraLinear", "LoraSettings", "SlotLoraLinear", "adapter_state_dict", "add_lora",
    "attach_adapter", "has_lora", "load_adapter", "load_adapter_state_dict", "lora_modules", "merge_and_unload",
    "merge_lora", "save_adapter", "trainable_parameters", "unmerge_lora",
]  # fmt: skip

# Mamba in/out projections, shared attention q/k/v/o, shared MLP gate_up/down, and each hybrid layer's `linear`.
DEFAULT_TARGETS: list[str] = [
    "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "linear",
]  # fmt: skip

# PEFT's prefix in front of every module path in adapter_model.safetensors.
PEFT_PREFIX = "base_model.model."
_HEADS = ("lm_head", "score")


@dataclass
class LoraSettings:
    """What add_lora was asked for; recorded on the model (`model.lora_settings`) for save_adapter."""

    r: int
    alpha: float
    targets: list[str] | str
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ---- module paths in PEFT's view -----------------------------------------------------------------


def _uses(model: nn.Module) -> Iterator[tuple[str, nn.Module, int | None]]:
    """(PEFT path, module, slot) for every module as transformers' tree would name it: modules inside a shared
    block once per hybrid layer using it (slot = its hybrid ordinal), every other module once (slot None)."""
    blocks = {id(m) for m in model.modules() if isinstance(m, SharedBlock)}

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            if id(child) in blocks:
                continue  # reached through the hybrid layers below, once per use
            path = f"{prefix}{name}"
            yield path, child
            yield from walk(path + ".", child)

    yield from ((path, m, None) for path, m in walk("", model))
    for path, layer in model.named_modules():
        if isinstance(layer, HybridLayer):
            for sub, m in layer.shared_transformer.named_modules():
                yield f"{path}.shared_transformer" + (f".{sub}" if sub else ""), m, layer.slot


def _matches(path: str, targets: list[str] | str) -> bool:
    """PEFT's target_modules rule: a regex string matches the whole path; a list entry matches by suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _head_path(path: str) -> bool:
    return path.rpartition(".")[2] in _HEADS


def _is_target(path: str, module: nn.Module, settings: LoraSettings) -> bool:
    if settings.exclude and _matches(path, settings.exclude):
        return False
    if settings.targets == "all-linear":  # PEFT's shorthand: every linear except the output head
        return isinstance(module, nn.Linear) and not _head_path(path)
    return _matches(path, settings.targets)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraBase, int | None]]:
    """(PEFT path, wrapped linear, slot) for every adapter in the model, in module order."""
    for path, m, slot in _uses(model):
        if isinstance(m, SlotLoraLinear) and str(slot) in m.lora_A:
            yield path, m, slot
        elif isinstance(m, LoraLinear):
            yield path, m, None


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraBase) for m in model.modules())


# ---- adding adapters -----------------------------------------------------------------------------


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | str | None = None,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
) -> list[str]:
    """Wrap every linear whose PEFT path matches `targets` (default DEFAULT_TARGETS) with a LoRA of `rank`,
    scaling alpha / rank, and freeze every other parameter. `modules_to_save` (a sequence-classification model
    adds "score", as PEFT's SEQ_CLS task does) stay trainable whole and are saved with the adapter.

    Returns the PEFT paths that got an adapter (one per use for shared-block linears)."""
    if modules_to_save is None:
        modules_to_save = ["score"] if hasattr(model, "score") else []
    settings = LoraSettings(r=rank, alpha=alpha, targets=DEFAULT_TARGETS if targets is None else targets,
                            dropout=dropout, modules_to_save=list(modules_to_save))  # fmt: skip
    return apply_lora(model, settings, explicit_targets=targets is not None)


def _check_settings(s: LoraSettings) -> None:
    if isinstance(s.r, bool) or not isinstance(s.r, int) or s.r < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {s.r!r}")
    if isinstance(s.alpha, bool) or not isinstance(s.alpha, (int, float)) or not math.isfinite(s.alpha):
        raise ValueError(f"LoRA alpha must be a finite number, got {s.alpha!r}")
    if not isinstance(s.dropout, (int, float)) or not 0.0 <= s.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {s.dropout!r}")
    if isinstance(s.targets, str):
        if s.targets != "all-linear":
            try:
                re.compile(s.targets)
            except re.error as err:
                raise ValueError(f"LoRA targets {s.targets!r} is not a valid regular expression: {err}") from None
    elif not s.targets or not all(isinstance(t, str) and t for t in s.targets):
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {s.targets!r}")


def apply_lora(model: nn.Module, settings: LoraSettings, explicit_targets: bool = True) -> list[str]:
    """add_lora from a LoraSettings (also what load_adapter uses). With `explicit_targets`, each listed target
    must match some module; the default list only needs to match something."""
    _check_settings(settings)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; add them once (or load a fresh model)")
    uses = list(_uses(model))
    chosen: dict[str, list[tuple[str, int | None]]] = {}  # our module name -> [(PEFT path, slot)]
    ours = {id(m): n for n, m in model.named_modules()}
    for path, m, slot in uses:
        if not _is_target(path, m, settings):
            continue
        if isinstance(m, QuantizedLinear):
            raise ValueError(
                f"LoRA target matches {path}, a quantised linear; adapters go on float weights: load the float "
                "checkpoint with adapter= and quantize= together (adapters are merged before quantising)"
            )
        if not is_plain(m):
            raise ValueError(
                f"LoRA target matches {path}, a {type(m).__name__}; only linear layers (nn.Linear) take an adapter "
                "here (targets are module-name suffixes such as 'q_proj' or 'mamba.in_proj')"
            )
        chosen.setdefault(ours[id(m)], []).append((path, slot))
    _check_coverage(settings, [p for p, _, _ in uses], chosen, explicit_targets)

    for p in model.parameters():
        p.requires_grad_(False)
    for name, picked in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        slots = [s for _, s in picked]
        if slots[0] is None:
            wrapped: LoraBase = LoraLinear(base, settings.r, settings.scaling, settings.dropout)
        else:
            wrapped = SlotLoraLinear(base, settings.r, settings.scaling, settings.dropout, sorted(slots))
        setattr(parent, child, wrapped)
    for p_name, p in model.named_parameters():
        if ".lora_A." in p_name or ".lora_B." in p_name:
            p.requires_grad_(True)
    for _, m in saved_modules(model, settings.modules_to_save):
        for p in m.parameters():
            p.requires_grad_(True)
    model.lora_settings = settings
    return [path for path, _, _ in lora_modules(model)]


def _check_coverage(settings: LoraSettings, paths: list[str], chosen: dict, explicit_targets: bool) -> None:
    example = next((p for p in paths if p.endswith("in_proj")), paths[-1] if paths else "")
    hint = f"module paths look like {example!r}; a target matches a path equal to it or ending in '.' + it"
    if not chosen:
        raise ValueError(f"LoRA targets {settings.targets!r} match no linear layer of this model ({hint})")
    if explicit_targets and isinstance(settings.targets, list):
        unmatched = [t for t in settings.targets if not any(_matches(p, [t]) for p in paths)]
        if unmatched:
            raise ValueError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match no module ({hint})")


def saved_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules named by `modules_to_save` (PEFT's suffix rule), outside the shared blocks. Names that match
    nothing are skipped, as PEFT does (its SEQ_CLS default lists both "classifier" and "score")."""
    if not names:
        return []
    found = []
    for path, m, slot in _uses(model):
        if _matches(path, names):
            if slot is not None:
                raise ValueError(f"modules_to_save: {path} lies in a shared block; only unshared modules can be saved")
            found.append((path, m))
    return found


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, each once, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---- merging -------------------------------------------------------------------------------------


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Add scaling * B A into each adapted base weight; the adapters then sit idle until unmerge_lora.

    A shared block's weight serves several hybrid layers, each with its own adapter, so it cannot hold one
    merged weight: those adapters stay active (unmerged) and their PEFT paths are returned. A shared block
    serving a single hybrid layer merges like any other linear."""
    uses = {id(m): len(b.slots) for b in model.modules() if isinstance(b, SharedBlock) for m in b.modules()}
    kept = []
    for path, m, slot in lora_modules(model):
        if m.merged:
            continue
        if isinstance(m, SlotLoraLinear):
            if uses[id(m)] > 1:
                kept.append(path)
                continue
            m._merge_factors(m.lora_A[str(slot)], m.lora_B[str(slot)], +1.0)
        else:
            m._merge_factors(m.lora_A, m.lora_B, +1.0)
        m.merged = True
    return kept


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract what merge_lora added (the base weights come back up to rounding in their dtype)."""
    for _, m, slot in lora_modules(model):
        if not m.merged:
            continue
        A, B = (m.lora_A, m.lora_B) if slot is None else (m.lora_A[str(slot)], m.lora_B[str(slot)])
        m._merge_factors(A, B, -1.0)
        m.merged = False


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> list[str]:
    """merge_lora, then plain nn.Linear layers holding the merged weights in place of the merged wrappers (for
    inference and quantisation; there is no unmerging after this). Adapters that cannot merge (per-use ones on
    a shared block serving several hybrid layers, see merge_lora) stay; their PEFT paths are returned."""
    kept = merge_lora(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraBase) and m.merged:
            plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return kept


def attach_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    quantize: str | None = None,
    quantize_group_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """What `from_pretrained(..., adapter=folder)` does after loading: load the adapter, frozen and unmerged
    (the same numbers as PEFT on transformers). With `quantize`, the adapters are merged into the float
    weights first and the result quantised; those that cannot merge stay in float beside it."""
    paths = load_adapter(model, folder)
    if quantize is not None:
        merge_and_unload(model)
        model.quantize(quantize, group_size=quantize_group_size, progress=progress)
    return paths


# ---- state dicts in PEFT's key names -------------------------------------------------------------


def _factor_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT key -> our parameter, for every LoRA factor and every modules_to_save tensor."""
    out: dict[str, nn.Parameter] = {}
    for path, m, slot in lora_modules(model):
        A, B = (m.lora_A, m.lora_B) if slot is None else (m.lora_A[str(slot)], m.lora_B[str(slot)])
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.weight
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.weight
    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    for path, m in saved_modules(model, settings.modules_to_save if settings else []):
        for name, p in m.named_parameters():
            out[f"{PEFT_PREFIX}{path}.{name}"] = p
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached, not copied) under the keys PEFT saves:
    base_model.model.<PEFT path>.lora_A.weight / .lora_B.weight, and base_model.model.<path>.<param> for
    modules_to_save."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    return {k: p.detach() for k, p in _factor_params(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-keyed tensors into the model's adapters. Strict: a missing or unexpected key, or a shape that
    differs, is an error naming the keys. Values are converted to each parameter's dtype and device."""
    params = _factor_params(model)
    if not params:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_shown(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_shown(unexpected)}")
        raise ValueError(f"{source}: the adapter does not fit this model's LoRA layout; " + "; ".join(parts))
    if any(m.merged for _, m, _ in lora_modules(model)):
        raise ValueError(f"{source}: load adapter weights before merge_lora, not after (call unmerge_lora first)")
    for key, p in params.items():
        if tuple(sd[key].shape) != tuple(p.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(sd[key].shape)}, the model expects {tuple(p.shape)}")
    for key, p in params.items():
        p.copy_(sd[key].to(device=p.device, dtype=p.dtype))


def _shown(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---- PEFT folders --------------------------------------------------------------------------------


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format (peft's PeftModel.from_pretrained
    loads them onto transformers' Zamba2). task_type is CAUSAL_LM or SEQ_CLS from the model class."""
    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    if settings is None or not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save (call add_lora or load_adapter first)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.contiguous().cpu() for k, t in adapter_state_dict(model).items()}
    config = peft_format.settings_to_config(settings, peft_format.TASK_TYPES.get(type(model).__name__),
                                            base_model_name_or_path)  # fmt: skip
    _write_atomic(out / peft_format.WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomic(out / peft_format.CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))


def load_adapter(model: nn.Module, folder: str | os.PathLike, trainable: bool = False) -> list[str]:
    """Add the adapters that `folder`'s adapter_config.json describes, then load adapter_model.safetensors
    into them (strictly). Frozen unless `trainable` (then the adapters and modules_to_save train, as after
    add_lora). Returns the PEFT paths that got an adapter."""
    src = Path(folder)
    cfg = peft_format.read_config(src)
    cfg_path = src / peft_format.CONFIG_NAME
    peft_format.check_task_type(cfg, type(model).__name__, cfg_path)
    settings = peft_format.config_to_settings(cfg, cfg_path, LoraSettings)
    weights = src / peft_format.WEIGHTS_NAME
    if not weights.is_file():
        if (src / peft_format.PICKLE_NAME).is_file():
            raise ValueError(
                f"{src}: only {peft_format.PICKLE_NAME} (a pickle) is there; pickles are never loaded. Convert it:\n"
                "  import torch, safetensors.torch\n"
                f"  sd = torch.load('{src / peft_format.PICKLE_NAME}', weights_only=True)\n"
                f"  safetensors.torch.save_file(sd, '{weights}')"
            )
        raise FileNotFoundError(f"{src}: no {peft_format.WEIGHTS_NAME}")
    try:
        sd = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    paths = apply_lora(model, settings, explicit_targets=False)
    load_adapter_state_dict(model, sd, source=str(weights))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return paths


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
