"""Checkpoints: find a model folder (local or hub), read config.json, load safetensors weights, save them.

The model's own `state_dict()` names are the published (de-duplicated) checkpoint names, so loading is
"match names, check shapes, assign". This file is the one place that maps other layouts onto those names:

* repeated shared blocks: fine-tuned / merged checkpoints store `model.layers.H.shared_transformer.*` under
  every hybrid layer H; copy j is block j % num_mem_blocks and must equal the stored block;
* the original Zyphra layout (`model.mamba_layers.*`, `model.blocks.*`), renamed by zamba2/legacy.py.

Memory: the model is built on the meta device and every tensor is read from a memory-mapped safetensors
file, converted to the target dtype/device and assigned, one at a time. The file is re-opened every
`_MAP_BUDGET` bytes so that pages already copied out are unmapped: peak RSS stays near one copy of the
weights in the target dtype.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from zamba2 import quant
from zamba2.config import Zamba2Config
from zamba2.legacy import convert_legacy_config, is_legacy_config, is_legacy_key, legacy_key_map

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = [
    CONFIG_NAME, GENERATION_CONFIG_NAME, "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
]  # fmt: skip
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_HEADS = ("lm_head.", "score.")
_SHARED = re.compile(r"model\.layers\.(\d+)\.shared_transformer\.(.+)")
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
) -> Path:
    """A local folder as is; otherwise a hub id ("org/name") fetched with huggingface_hub.

    The hub path honours HF_HUB_OFFLINE and the local cache (a cached snapshot needs no network) and
    fetches only config, safetensors and tokenizer files (only the configs when `config_only`).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model folder or a hub id like 'org/name'")
    name = str(path_or_id)
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"{name}: no such folder, and it does not look like a hub id ('org/name')")
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


# ---- mapping file names onto the model's names ---------------------------------------------------


@dataclass
class KeyPlan:
    """How file tensors fill the model: `sources[model_key] = file_key`; `copies` are extra file tensors
    that must equal their source (repeated shared blocks, a tied lm_head); `ignored` are left out."""

    sources: dict[str, str]
    copies: list[tuple[str, str]]  # (model_key, file_key)
    ignored: list[str]


def shared_block_key_map(keys: list[str], config: Zamba2Config) -> KeyPlan:
    """Published names, with shared blocks either stored once or repeated under every hybrid layer.

    Hybrid ordinal j runs block j % num_mem_blocks, stored under hybrid layer hybrid_layer_ids[j % nmb];
    a copy under any other hybrid layer is checked against it.
    """
    hybrid = config.hybrid_layer_ids
    ordinal = {layer: j for j, layer in enumerate(hybrid)}
    candidates: dict[str, list[str]] = {}
    ignored = []
    for key in keys:
        if key.endswith("._extra_state"):
            ignored.append(key)
            continue
        m = _SHARED.fullmatch(key)
        if m is None or int(m[1]) not in ordinal:
            candidates.setdefault(key, []).append(key)
            continue
        owner = hybrid[ordinal[int(m[1])] % config.num_mem_blocks]
        candidates.setdefault(f"model.layers.{owner}.shared_transformer.{m[2]}", []).append(key)
    sources: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    for ours, found in candidates.items():
        primary = ours if ours in found else found[0]
        sources[ours] = primary
        copies.extend((ours, k) for k in found if k != primary)
    return KeyPlan(sources, copies, ignored)


def plan_keys(files: WeightFiles, model: nn.Module, config: Zamba2Config, folder: Path) -> KeyPlan:
    """Match the file's tensors to the model's state_dict names; raise on anything missing or unexpected."""
    keys = list(files.key_to_file)
    if files.is_legacy:
        try:
            mapping, dropped = legacy_key_map(keys, config)
        except ValueError as err:
            raise ValueError(f"{files.source}: {err}") from err
        plan = KeyPlan(mapping, [], dropped)
    else:
        # Published names carry the "model." prefix; a bare Zamba2Model's checkpoint does not.
        bare = not any(k.startswith("model.") for k in keys)
        canon = {(f"model.{k}" if bare and not k.startswith(_HEADS) else k): k for k in keys}
        plan = shared_block_key_map(list(canon), config)
        plan.sources = {ours: canon[k] for ours, k in plan.sources.items()}
        plan.copies = [(ours, canon[k]) for ours, k in plan.copies]
        plan.ignored = [canon[k] for k in plan.ignored]

    expected = set(model.state_dict().keys())
    if not any(k.startswith("model.") for k in expected):  # a bare Zamba2Model: no prefix, no head
        plan.ignored += [src for ours, src in plan.sources.items() if not ours.startswith("model.")]
        plan.sources = {ours[6:]: src for ours, src in plan.sources.items() if ours.startswith("model.")}
        plan.copies = [(ours[6:], src) for ours, src in plan.copies]
    for head in _HEADS:  # the other head's weights, e.g. a causal LM's lm_head loaded into a classifier
        if not any(k.startswith(head) for k in expected):
            for ours in [k for k in plan.sources if k.startswith(head)]:
                plan.ignored.append(plan.sources.pop(ours))
    if plan.ignored:
        logger.debug("%s: ignoring %d tensors: %s", files.source, len(plan.ignored), ", ".join(plan.ignored))

    if config.tie_word_embeddings and "lm_head.weight" in expected:
        expected.discard("lm_head.weight")
        if "lm_head.weight" in plan.sources:  # stored although tied: only acceptable as an exact copy
            plan.copies.append(("model.embed_tokens.weight", plan.sources.pop("lm_head.weight")))

    missing = sorted(expected - set(plan.sources) - _initialisable(model, expected))
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensors the model needs: {shown}")
    unexpected = sorted(set(plan.sources) - expected)
    if unexpected:
        shown = ", ".join(
            k if k == plan.sources[k] else f"{plan.sources[k]} (as {k})" for k in unexpected[:5]
        )
        raise ValueError(
            f"{files.source}: {len(unexpected)} tensors do not belong to this model "
            f"({type(model).__name__} with this config.json): {shown}"
        )
    return plan


def _initialisable(model: nn.Module, expected: set[str]) -> set[str]:
    """Weights that may be absent: only a classifier's `score` head, as when fine-tuning from a base model."""
    return {k for k in expected if k.startswith("score.")} if hasattr(model, "score") else set()


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


def load_pretrained(
    cls: type[nn.Module],
    path_or_id: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
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
    classifier) are applied on top of either.
    """
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
    load_state_into(model, folder, target, device, progress=progress, legacy_config=legacy)
    if quantize is not None:
        # Quantised after loading, one layer at a time; recorded so that save_pretrained persists it.
        model.quantize(quantize, group_size=quantize_group_size, progress=progress)
    return model.eval()


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
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen_text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / GENERATION_CONFIG_NAME, lambda p: p.write_text(gen_text))
