"""Checkpoints: find a model folder (local or hub), read config.json, load safetensors weights, save them.

The model's own `state_dict()` names are the published (de-duplicated) checkpoint names, so loading is
"match names, check shapes, assign". One module, keys.py, maps other layouts onto those names:

* repeated shared blocks: fine-tuned / merged checkpoints store `model.layers.H.shared_transformer.*` under
  every hybrid layer H; copy j is block j % num_mem_blocks and must equal the stored block;
* the original Zyphra layout (`model.mamba_layers.*`, `model.blocks.*`), renamed by zamba2/legacy.py.

Memory: the model is built on the meta device and every tensor is read from a memory-mapped safetensors
file, converted to the target dtype/device and assigned, one at a time. The file is re-opened every
`_MAP_BUDGET` bytes (files.py) so that pages already copied out are unmapped: peak RSS stays near one copy of
the weights in the target dtype.

* files.py: the model folder (local or hub), config.json, dtype names, which safetensors files hold the
  weights, reading headers and tensors;
* keys.py: file tensor names -> model names (the one key map);
* load.py: `load_state_into`, `load_pretrained`;
* save.py: `save_pretrained`, sharding, atomic writes.

The hub download is looked up as `zamba2.checkpoint.files.snapshot_download`; patch it there.
"""

from zamba2.checkpoint.files import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    HUB_PATTERNS,
    TOKENIZER_PATTERNS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WeightFiles,
    eos_token_ids,
    find_weight_files,
    iter_tensors,
    read_config,
    read_headers,
    resolve_dtype,
    resolve_model_dir,
)
from zamba2.checkpoint.keys import KeyPlan, plan_keys, shared_block_key_map
from zamba2.checkpoint.load import load_pretrained, load_state_into
from zamba2.checkpoint.save import parse_size, save_pretrained

__all__ = [
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "HUB_PATTERNS",
    "TOKENIZER_PATTERNS",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "KeyPlan",
    "WeightFiles",
    "eos_token_ids",
    "find_weight_files",
    "iter_tensors",
    "load_pretrained",
    "load_state_into",
    "parse_size",
    "plan_keys",
    "read_config",
    "read_headers",
    "resolve_dtype",
    "resolve_model_dir",
    "save_pretrained",
    "shared_block_key_map",
]
