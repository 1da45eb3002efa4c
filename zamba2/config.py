"""Zamba2Config: the config.json of a Zamba2 checkpoint as a dataclass.

Field names are the config.json names used by the published checkpoints and by transformers, so a
config.json maps onto this class key for key. Derived sizes are properties computed here and nowhere
else. Keys we do not model (architectures, torch_dtype, transformers_version, ...) are kept in
`extras` and written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Block-type spellings accepted on input. "linear_attention" is what newer transformers releases call a
# plain Mamba2 layer; we always write "mamba" / "hybrid" so that old and new releases both read our files.
_BLOCK_ALIASES = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "hybrid"}
_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "swish", "relu")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def default_block_types() -> list[str]:
    """The Zamba2-2.7B layout (54 layers, 9 hybrid), transformers' default."""
    return (
        ["mamba"]
        + (["mamba"] * 5 + ["hybrid"]) * 7
        + ["mamba"] * 4
        + ["hybrid"]
        + ["mamba"] * 3
        + ["hybrid"]
        + ["mamba"] * 2
    )


def _hybrid_every(n_layers: int, ids: list[int]) -> list[str]:
    return ["hybrid" if i in ids else "mamba" for i in range(n_layers)]


@dataclass
class Zamba2Config:
    """Configuration of a Zamba2 model; parameter names and defaults follow `transformers.Zamba2Config`.

    `use_long_context=True` follows the documented behaviour ("activates the context-extended version by
    modifying RoPE"): the RoPE base becomes `rope_theta * 8 ** (d / (d - 2))` with `d` the attention head
    dim and `max_position_embeddings` becomes 16384. (transformers 5.23 logs this but no longer rescales.)
    """

    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    hidden_size: int = 2560
    num_hidden_layers: int = 54
    layers_block_type: list[str] | None = None
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] | None = None
    n_mamba_heads: int = 8
    use_conv_bias: bool = True
    chunk_size: int = 256
    use_mem_eff_path: bool = False
    add_bias_linear: bool = False
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    attention_dropout: float = 0.0
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    rope_theta: float = 10000.0
    rope_parameters: dict[str, Any] | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    use_long_context: bool = False
    tie_word_embeddings: bool = True
    # sequence classification
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    # unknown config.json keys, written back unchanged
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "zamba2"

    def __post_init__(self) -> None:
        if self.layers_block_type is None:
            self.layers_block_type = default_block_types()
        else:
            types = []
            for i, t in enumerate(self.layers_block_type):
                if t not in _BLOCK_ALIASES:
                    raise ValueError(
                        f"layers_block_type[{i}] is {t!r}; expected one of 'mamba', 'linear_attention', 'hybrid'"
                    )
                types.append(_BLOCK_ALIASES[t])
            self.layers_block_type = types
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # rope_theta and rope_parameters both appear in published config.json files; rope_parameters wins.
        if self.rope_parameters is not None:
            rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"rope_parameters.rope_type is {rope_type!r}; only 'default' RoPE is supported")
            self.rope_theta = float(self.rope_parameters.get("rope_theta", self.rope_theta))
        self.rope_parameters = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.use_long_context:
            self.max_position_embeddings = 16384
        if self.time_step_limit is not None:
            self.time_step_limit = (float(self.time_step_limit[0]), float(self.time_step_limit[1]))
        self._fill_labels()
        self.validate()

    def _fill_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if self.num_labels is None:
                self.num_labels = len(self.id2label)
        if self.num_labels is None:
            self.num_labels = 2
        if self.id2label is None or len(self.id2label) != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != self.num_labels:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {k: int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        """Raise ValueError naming the field for any combination the model cannot be built from."""
        positive = (
            "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "mamba_d_state",
            "mamba_d_conv", "mamba_expand", "mamba_ngroups", "n_mamba_heads", "chunk_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "num_mem_blocks", "adapter_rank", "num_labels",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not 0.0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                "time_step_min/time_step_max must satisfy 0 < min <= max, "
                f"got {self.time_step_min}, {self.time_step_max}"
            )
        if len(self.layers_block_type) != self.num_hidden_layers:
            raise ValueError(
                f"layers_block_type has {len(self.layers_block_type)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; they must match"
            )
        if (self.mamba_expand * self.hidden_size) % self.n_mamba_heads:
            raise ValueError(
                f"n_mamba_heads ({self.n_mamba_heads}) must divide mamba_expand * hidden_size "
                f"({self.mamba_expand * self.hidden_size})"
            )
        if self.n_mamba_heads % self.mamba_ngroups:
            raise ValueError(
                f"mamba_ngroups ({self.mamba_ngroups}) must divide n_mamba_heads ({self.n_mamba_heads})"
            )
        if (2 * self.hidden_size) % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide the attention width "
                f"2 * hidden_size ({2 * self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.use_mem_rope and self.attention_head_dim % 2:
            raise ValueError(f"RoPE needs an even attention head dim, got {self.attention_head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act is {self.hidden_act!r}; expected one of {', '.join(_ACTIVATIONS)}")
        if self.problem_type is not None and self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type is {self.problem_type!r}; expected one of {', '.join(_PROBLEM_TYPES)}")
        if self.time_step_limit is not None and not self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"time_step_limit must be (low, high) with low <= high, got {self.time_step_limit}")

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def attention_hidden_size(self) -> int:
        """Width of the shared block input: concat(hidden, original embeddings)."""
        return 2 * self.hidden_size

    @property
    def attention_head_dim(self) -> int:
        return 2 * self.hidden_size // self.num_attention_heads

    @property
    def mamba_intermediate_size(self) -> int:
        """I = mamba_expand * hidden_size, the width of x, z and y inside the mixer."""
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_headdim(self) -> int:
        """P, the per-head channel count of the SSM."""
        return self.mamba_intermediate_size // self.n_mamba_heads

    @property
    def mamba_conv_dim(self) -> int:
        """Channels through the depthwise conv: x, B and C together (I + 2GN)."""
        return self.mamba_intermediate_size + 2 * self.mamba_ngroups * self.mamba_d_state

    @property
    def hybrid_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layers_block_type) if t == "hybrid"]

    @property
    def dt_limit(self) -> tuple[float, float]:
        """Clamp range of dt after softplus, the same in prefill and decode (see README)."""
        if self.time_step_limit is not None:
            return self.time_step_limit
        return (self.time_step_min, math.inf)

    @property
    def rope_base(self) -> float:
        """The RoPE base actually used, after the long-context rescale."""
        if self.use_long_context:
            d = self.attention_head_dim
            return self.rope_theta * 8 ** (d / (d - 2))
        return self.rope_theta

    # ---- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> Zamba2Config:
        """Build from a config.json dict; unknown keys go to `extras`. `overrides` win over `data`."""
        data = {**data, **overrides}
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config model_type is {model_type!r}, expected 'zamba2'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in names}
        extras = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        extras.update(data.get("extras") or {})
        if isinstance(known.get("time_step_limit"), list):
            known["time_step_limit"] = tuple(known["time_step_limit"])
        return cls(**known, extras=extras)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Zamba2Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> Zamba2Config:
        """Read config.json (upstream or legacy format) from a local folder or a Hugging Face hub id.

        `overrides` are config field values that replace the file's, e.g. num_labels=3."""
        from zamba2.checkpoint import read_config, resolve_model_dir

        folder = resolve_model_dir(path_or_id, revision=revision, config_only=True, cache_dir=cache_dir, token=token)
        return read_config(folder, overrides)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extras":
                continue
            value = copy.deepcopy(getattr(self, f.name))
            if f.name == "id2label":
                value = {str(k): v for k, v in value.items()}
            if isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        if out["time_step_limit"] is None:
            del out["time_step_limit"]
        out.update(copy.deepcopy(self.extras))
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json_string())

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.to_json_file(Path(folder) / "config.json")

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Zamba2Config:
        """Published architectures ("1.2b", "2.7b", "7b") and a "tiny" one for tests and demos."""
        key = name.lower().removeprefix("zamba2-")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=32000, hidden_size=64, num_hidden_layers=6, layers_block_type=_hybrid_every(6, [1, 4]),
        mamba_d_state=16, n_mamba_heads=4, num_attention_heads=4, intermediate_size=128, num_mem_blocks=2,
        use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True, chunk_size=16,
    ),
    "1.2b": dict(
        hidden_size=2048, num_hidden_layers=38, layers_block_type=_hybrid_every(38, [5, 11, 17, 23, 29, 35]),
        mamba_d_state=128, n_mamba_heads=64, mamba_ngroups=1, num_attention_heads=32, num_key_value_heads=32,
        num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=128, use_mem_rope=True,
        intermediate_size=8192,
    ),
    "2.7b": dict(
        hidden_size=2560, num_hidden_layers=54, layers_block_type=default_block_types(), mamba_d_state=64,
        n_mamba_heads=80, num_attention_heads=32, num_key_value_heads=32, num_mem_blocks=2,
        use_shared_attention_adapter=False, use_mem_rope=False, intermediate_size=10240,
    ),
    # 7B: 81 layers, 13 hybrid. The exact hybrid positions are not to hand; this spacing (every 6th layer
    # from 5) gives the published count and is what the benchmark needs.
    "7b": dict(
        hidden_size=3584, num_hidden_layers=81, layers_block_type=_hybrid_every(81, list(range(5, 81, 6))),
        mamba_d_state=64, n_mamba_heads=112, num_attention_heads=32, num_key_value_heads=32, num_mem_blocks=2,
        use_shared_attention_adapter=True, adapter_rank=128, use_mem_rope=True, intermediate_size=14336,
    ),
}
