"""The one place that maps the tensor names in a checkpoint's files onto the model's `state_dict()` names.

The model's own names are the published (de-duplicated) checkpoint names, so loading is "match names, check
shapes, assign". Other layouts mapped here:

* repeated shared blocks: fine-tuned / merged checkpoints store `model.layers.H.shared_transformer.*` under
  every hybrid layer H; copy j is block j % num_mem_blocks and must equal the stored block;
* the original Zyphra layout (`model.mamba_layers.*`, `model.blocks.*`), renamed by zamba2/legacy.py;
* a bare Zamba2Model's checkpoint (no "model." prefix), the other head's weights, a tied lm_head stored anyway.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from zamba2.checkpoint.files import WeightFiles
from zamba2.config import Zamba2Config
from zamba2.legacy import legacy_key_map

logger = logging.getLogger("zamba2.checkpoint")

_HEADS = ("lm_head.", "score.")
_SHARED = re.compile(r"model\.layers\.(\d+)\.shared_transformer\.(.+)")


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

