"""The original (legacy) Zamba2 checkpoint format, renamed into ours at load time.

The first Zamba2 releases used Megatron-style names: a config with `state_size`, `expansion_factor`,
`ffn_hidden_size`, `lora_rank`, layer types "m"/"g", and weights under `model.mamba_layers.L`,
`model.linear_layers.j` and `model.blocks.b`. Nothing here reads files: `zamba2.checkpoint` detects the
format and calls these pure functions to rename config keys and tensor names in memory. No tensor needs
reordering; every legacy tensor has the shape of its new name.

Legacy layout, with H = the hybrid layer ids in order, j = hybrid ordinal, b = shared block index:

    model.mamba_layers.L.input_layernorm.weight -> model.layers.L.input_layernorm.weight          (mamba L)
                                                   ...L.mamba_decoder.input_layernorm.weight     (hybrid L)
    model.mamba_layers.L.mamba.X                -> model.layers.L.mamba.X / ...mamba_decoder.mamba.X
                                                   (older revisions: in_proj.0.weight -> in_proj.weight)
    model.linear_layers.j.weight                -> model.layers.H[j].linear.weight
    model.blocks.b.X                            -> model.layers.H[b].shared_transformer.X'  (renamed below)

Each legacy block stores one adapter per hybrid layer k, but hybrid layer k only runs block k % nmb: the
entries with k % nmb != b were never used and are dropped.
"""

from __future__ import annotations

import re
from typing import Any

from zamba2.config import Zamba2Config

# Legacy config keys renamed one-to-one.
_RENAMED = {
    "state_size": "mamba_d_state",
    "conv_dimension": "mamba_d_conv",
    "expansion_factor": "mamba_expand",
    "ffn_hidden_size": "intermediate_size",
    "lora_rank": "adapter_rank",
    "use_shared_attention_lora": "use_shared_attention_adapter",
    "se_shared_attention_lora": "use_shared_attention_adapter",  # misspelt in some released configs
}
# Keys that must be true: the published architecture has no other variant we could build.
_MUST_BE_TRUE = ("use_shared_block_lora", "gated_linear_unit")
# Keys derived from others; dropped.
_DERIVED = ("kv_channels", "num_query_groups", "mamba_headdim")
_LEGACY_MARKERS = ("state_size", "expansion_factor", "ffn_hidden_size", "conv_dimension", "lora_rank")
_LEGACY_BLOCK_TYPES = {"m": "mamba", "g": "hybrid"}


def is_legacy_config(d: dict[str, Any]) -> bool:
    """True for a config.json in the original Zyphra format."""
    types = d.get("layers_block_type") or []
    if any(t in _LEGACY_BLOCK_TYPES for t in types):
        return True
    return any(key in d for key in _LEGACY_MARKERS)


def convert_legacy_config(d: dict[str, Any]) -> dict[str, Any]:
    """Rename a legacy config dict into config.json names that `Zamba2Config.from_dict` reads.

    Raises ValueError naming the key for settings the architecture cannot honour (a false
    `use_shared_block_lora` / `gated_linear_unit`, a true `ft_lora`) or for inconsistent sizes.
    Keys that are neither renamed nor derived keep their name (unknown ones land in `extras`).
    """
    for key in _MUST_BE_TRUE:
        if key in d and d[key] is not True:
            raise ValueError(f"legacy config key {key!r} is {d[key]!r}; this architecture needs true")
    if d.get("ft_lora"):
        raise ValueError(
            "legacy config key 'ft_lora' is true: separate fine-tuning LoRA weights are not supported; "
            "merge them into the base weights first"
        )

    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in _MUST_BE_TRUE or key in _DERIVED or key == "ft_lora":
            continue
        new = _RENAMED.get(key, key)
        if new in out and out[new] != value:
            raise ValueError(
                f"legacy config sets {new!r} twice, to {out[new]!r} and to {value!r} (from {key!r})"
            )
        out[new] = value

    if "layers_block_type" in d:
        types = []
        for i, t in enumerate(d["layers_block_type"]):
            types.append(_LEGACY_BLOCK_TYPES.get(t, t))
            if types[-1] not in ("mamba", "hybrid"):
                raise ValueError(f"legacy config layers_block_type[{i}] is {t!r}; expected 'm' or 'g'")
        out["layers_block_type"] = types

    if "mamba_headdim" in d:
        hidden, headdim = d.get("hidden_size"), d["mamba_headdim"]
        expand = d.get("expansion_factor", d.get("mamba_expand", 2))
        if not all(isinstance(v, int) and v > 0 for v in (hidden, expand, headdim)):
            raise ValueError(
                "legacy config needs positive integers hidden_size, expansion_factor and mamba_headdim, got "
                f"{hidden!r}, {expand!r}, {headdim!r}"
            )
        if (expand * hidden) % headdim:
            raise ValueError(
                f"legacy config mamba_headdim ({headdim}) does not divide expansion_factor * hidden_size "
                f"({expand * hidden})"
            )
        out["n_mamba_heads"] = expand * hidden // headdim
    out.setdefault("mamba_ngroups", 1)
    # num_query_groups is the Megatron name of the kv head count; only needed when the modern key is absent.
    if "num_key_value_heads" not in out and "num_query_groups" in d:
        out["num_key_value_heads"] = d["num_query_groups"]
    return out


# ---- tensor names ----------------------------------------------------------------------------------
_MAMBA_LAYER = re.compile(r"model\.mamba_layers\.(\d+)\.(input_layernorm\.weight|mamba\.(.+))")
_MAMBA_PARAMS = re.compile(
    r"(in_proj)(?:\.0)?\.(weight|bias)|(conv1d|out_proj)\.(weight|bias)|(dt_bias|A_log|D)|(norm)\.(weight)"
)
_LINEAR = re.compile(r"model\.linear_layers\.(\d+)\.weight")
_BLOCK = re.compile(r"model\.blocks\.(\d+)\.(.+)")
_BLOCK_PLAIN = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_ff_layernorm.weight": "pre_ff_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "feed_forward.linear_fc1.weight": "feed_forward.gate_up_proj.weight",
    "feed_forward.linear_fc2.weight": "feed_forward.down_proj.weight",
}
# (attention q/k/v or MLP fc1) low-rank pair k: A is the down projection (.0), B the up projection (.1)
_BLOCK_ADAPTER = re.compile(
    r"(?:self_attn\.linear_([qkv])|feed_forward\.linear_fc1)_lora_([AB])_list\.(\d+)\.weight"
)
_SAME = ("model.embed_tokens.weight", "model.final_layernorm.weight", "lm_head.weight")


def is_legacy_key(key: str) -> bool:
    return key.startswith(("model.mamba_layers.", "model.linear_layers.", "model.blocks."))


def legacy_key_map(legacy_keys: list[str], config: Zamba2Config) -> tuple[dict[str, str], list[str]]:
    """Map legacy tensor names to ours.

    Returns `(mapping, dropped)`: `mapping[our_key] = legacy_key` for every tensor the model uses, and
    the legacy keys deliberately left out (unused adapter slots, Transformer Engine `_extra_state`).
    Raises ValueError naming the key for a name outside the legacy layout or an index out of range.
    """
    hybrid = config.hybrid_layer_ids
    nmb = config.num_mem_blocks
    mapping: dict[str, str] = {}
    dropped: list[str] = []

    def add(ours: str, legacy: str) -> None:
        if ours in mapping:
            raise ValueError(f"legacy tensors {mapping[ours]!r} and {legacy!r} both map to {ours!r}")
        mapping[ours] = legacy

    def index(value: str, limit: int, what: str, key: str) -> int:
        i = int(value)
        if i >= limit:
            raise ValueError(f"legacy tensor {key!r}: {what} {i} is out of range (the config has {limit})")
        return i

    for key in legacy_keys:
        if key.endswith("._extra_state"):
            dropped.append(key)
            continue
        if key in _SAME:
            add(key, key)
            continue
        if m := _MAMBA_LAYER.fullmatch(key):
            layer = index(m[1], config.num_hidden_layers, "layer", key)
            prefix = f"model.layers.{layer}." + ("mamba_decoder." if layer in hybrid else "")
            if m[3] is None:
                add(prefix + "input_layernorm.weight", key)
                continue
            p = _MAMBA_PARAMS.fullmatch(m[3])
            if p is None:
                raise ValueError(f"unknown legacy tensor {key!r} (not a Mamba2 mixer parameter)")
            name = ".".join(g for g in p.groups() if g is not None)  # drops the ".0" of older in_proj names
            add(prefix + "mamba." + name, key)
        elif m := _LINEAR.fullmatch(key):
            j = index(m[1], len(hybrid), "hybrid layer", key)
            add(f"model.layers.{hybrid[j]}.linear.weight", key)
        elif m := _BLOCK.fullmatch(key):
            b = index(m[1], nmb, "shared block", key)
            prefix = f"model.layers.{hybrid[b]}.shared_transformer."
            rest = m[2]
            if rest in _BLOCK_PLAIN:
                add(prefix + _BLOCK_PLAIN[rest], key)
            elif a := _BLOCK_ADAPTER.fullmatch(rest):
                qkv, side, k = a[1], a[2], index(a[3], len(hybrid), "adapter slot", key)
                if k % nmb != b:  # this block never serves hybrid layer k
                    dropped.append(key)
                    continue
                lst = (
                    f"self_attn.linear_{qkv}_adapter_list"
                    if qkv
                    else "feed_forward.gate_up_proj_adapter_list"
                )
                add(f"{prefix}{lst}.{k}.{0 if side == 'A' else 1}.weight", key)
            else:
                raise ValueError(f"unknown legacy tensor {key!r} in shared block {b}")
        else:
            raise ValueError(f"unknown legacy tensor {key!r}")
    return mapping, dropped
