"""GenerationConfig: the generation defaults a checkpoint ships in generation_config.json, in transformers' names.

`from_pretrained` puts one on `model.generation_config`; `generate` takes each argument the call leaves unset
(None) from it, then from these built-in defaults. Explicit argument > `generation_config=` (or the model's) >
built-in. The built-in defaults are this project's, which differ from transformers' in two places: without
max_new_tokens / max_length, 20 new tokens (transformers: max_length=20 counting the prompt), and no top-k unless
asked (transformers: top_k=50 when sampling).

Keys of generation_config.json this project does not act on are kept in `extras` (and written back by
`save_pretrained`); one that would change transformers' output (num_beams=4, say) is reported by a warning at
load, since generate would not do what the file asks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from zamba2 import compat

logger = logging.getLogger("zamba2.generation")

GENERATION_CONFIG_NAME = "generation_config.json"
# Bookkeeping keys transformers writes; neither acted on nor worth a warning.
_QUIET = {"_from_model_config", "transformers_version", "use_cache", "decoder_start_token_id"}


@dataclass
class GenerationConfig:
    """Defaults for `generate`; every field is one of its arguments (see zamba2.generation.generate)."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in transformers
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False
    prompt_lookup_num_tokens: int | None = None  # speculative decoding by n-gram lookup (zamba2/speculative.py)
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None  # draft length with generate(assistant_model=...)
    extras: dict[str, Any] = field(default_factory=dict)  # other keys of the file, kept for save_pretrained

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The token ids of a model's config.json (what transformers does for a checkpoint without the file)."""
        return cls(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "generation config") -> GenerationConfig:
        """Known keys become fields (checked); others go to `extras`, with a warning for any that matters."""
        names = {f.name for f in fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extras = {k: v for k, v in data.items() if k not in names}
        for key, value in known.items():
            _check(key, value, where)
        for key, value in extras.items():
            if key in _QUIET or key.startswith("_"):
                continue
            try:
                compat.reject(where, {key: value}, compat.GENERATE)
            except TypeError as err:
                logger.warning("%s; generate ignores it", err)
        return cls(**known, extras=extras)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, model_config: Any | None = None) -> GenerationConfig:
        """`folder/generation_config.json`; token ids it lacks come from `model_config` (config.json)."""
        path = Path(folder) / GENERATION_CONFIG_NAME
        base = cls() if model_config is None else cls.from_model_config(model_config)
        if not path.is_file():
            return base
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level")
        loaded = cls.from_dict(data, str(path))
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(loaded, name) is None:
                setattr(loaded, name, getattr(base, name))
        return loaded

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (token ids always), plus extras: what the file holds."""
        default = asdict(GenerationConfig())
        ours = asdict(self)
        extras = ours.pop("extras")
        keep = {"eos_token_id", "pad_token_id", "bos_token_id"}
        return {**extras, **{k: v for k, v in ours.items() if k in keep or v != default[k]}}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder, GENERATION_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def merged(base: GenerationConfig | None, **given: Any) -> GenerationConfig:
    """`base` (or the built-in defaults) with every argument the call set (not None) put over it."""
    base = base if base is not None else GenerationConfig()
    return replace(base, **{k: v for k, v in given.items() if v is not None})


_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "max_length": (int,), "min_new_tokens": (int,), "top_k": (int,),
    "do_sample": (bool,), "output_scores": (bool,), "output_logits": (bool,), "return_dict_in_generate": (bool,),
    "temperature": (int, float), "top_p": (int, float), "min_p": (int, float), "repetition_penalty": (int, float),
    "presence_penalty": (int, float), "frequency_penalty": (int, float),
    "eos_token_id": (int, list), "pad_token_id": (int,), "bos_token_id": (int,), "stop_strings": (str, list),
    "prompt_lookup_num_tokens": (int,), "max_matching_ngram_size": (int,), "num_assistant_tokens": (int,),
}  # fmt: skip


def _check(key: str, value: Any, where: str) -> None:
    types = _TYPES[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")
    if key in ("max_new_tokens", "max_length", "min_new_tokens", "top_k") and value < 0:
        raise ValueError(f"{where}: {key} must be >= 0, got {value}")
    if key in ("prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens") and value < 1:
        raise ValueError(f"{where}: {key} must be >= 1, got {value}")
    if key == "eos_token_id" and isinstance(value, list) and not all(isinstance(i, int) for i in value):
        raise ValueError(f"{where}: eos_token_id must be an int or a list of ints, got {value!r}")
