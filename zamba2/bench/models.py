"""Random-weight models for the benchmark: ours and the transformers reference, the same weights tensor by
tensor, and the quantisation-quality figures measured on them."""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import nn

from zamba2.config import Zamba2Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# transformers.Zamba2Config does not take these: time_step_limit is ours, rope_theta travels in
# rope_parameters, and the classification fields only matter to a classifier.
_NOT_REFERENCE_FIELDS = {
    "extras",
    "time_step_limit",
    "rope_theta",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
}


@torch.no_grad()
def fill_(t: torch.Tensor, key: str, config: Zamba2Config, seed: int = 0) -> torch.Tensor:
    """Fill `t` in place with the deterministic random value of our state_dict entry `key`.

    The value depends only on (seed, key, shape, dtype), so ours and the reference get the same weights
    tensor by tensor, each built directly in its dtype, without both models or an fp32 copy ever existing.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    name = key.rsplit(".", 1)[-1]
    if name == "A_log":  # A = -exp(A_log) = -(1..H), as Mamba2 initialises it
        t.copy_(torch.log(torch.arange(1, t.numel() + 1, dtype=torch.float32)).view(t.shape))
    elif name == "D":
        t.fill_(1.0)
    elif name == "dt_bias":  # softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max]
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(t.shape, generator=gen) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        t.copy_(dt + torch.log(-torch.expm1(-dt)))
    elif name == "bias":
        t.zero_()
    elif t.dim() == 1:  # norm weights
        t.fill_(1.0)
    else:
        t.normal_(0.0, config.initializer_range, generator=gen)
    return t


def build_ours(config: Zamba2Config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Our Zamba2ForCausalLM with random weights, built on meta, then materialised tensor by tensor."""
    from zamba2.model import Zamba2ForCausalLM

    with torch.device("meta"):
        model = Zamba2ForCausalLM(config)
    real: dict[int, nn.Parameter] = {}
    for key, p in model.named_parameters():  # each tensor once, under its first name (tied ones share it)
        real[id(p)] = nn.Parameter(fill_(torch.empty(p.shape, dtype=dtype), key, config, seed), requires_grad=False)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = real[id(p)]
    model.tie_weights()
    return model.eval()


def quality(config: Zamba2Config, positions: int = 320, seed: int = 0) -> dict[str, dict[str, float]]:
    """Quantisation error next to bf16 rounding, on random weights: relative logit error ||a - b|| / ||b|| and
    top-1 agreement over `positions` prompt positions, for bf16 vs fp32 and int8 / int4 vs bf16."""
    import copy

    fp32 = build_ours(config, torch.float32, seed)
    ids = torch.randint(3, config.vocab_size, (2, positions // 2), generator=torch.Generator().manual_seed(seed))

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, use_cache=False).logits.float()

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return {
            "relative_logit_error": ((a - b).norm() / b.norm()).item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }

    ref32 = logits(fp32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    del fp32
    ref16 = logits(bf16)
    out = {"bf16 vs fp32": compare(ref16, ref32)}
    for mode in ("int8", "int4"):
        q = copy.deepcopy(bf16)
        q.quantize(mode)
        out[f"{mode} vs bf16"] = compare(logits(q), ref16)
        del q
    return out


def reference_key(key: str, config: Zamba2Config) -> str:
    """Our state_dict key holding the value of the reference's `key`.

    The reference keeps a (tied) copy of the shared block under every hybrid layer; hybrid ordinal j uses
    block j % num_mem_blocks, which we register under hybrid layer j % num_mem_blocks.
    """
    m = re.fullmatch(r"model\.layers\.(\d+)\.shared_transformer\.(.+)", key)
    if m is not None:
        hybrid = config.hybrid_layer_ids
        j = hybrid.index(int(m[1]))
        return f"model.layers.{hybrid[j % config.num_mem_blocks]}.shared_transformer.{m[2]}"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return key


def build_reference(config: Zamba2Config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """transformers.Zamba2ForCausalLM of the same architecture in `dtype`, with the same weights as ours."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    # its notes that the CUDA kernels are missing and it falls back to torch: expected on a CPU
    warnings.filterwarnings("ignore", message=".*falling back.*")
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_REFERENCE_FIELDS}
    fields = {k: v for k, v in fields.items() if k in Zamba2Config.__dataclass_fields__}
    ref_config = transformers.Zamba2Config(**fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in dtype: no fp32 copy first
    try:
        model = transformers.Zamba2ForCausalLM(ref_config)
    finally:
        torch.set_default_dtype(previous)
    for key, p in model.named_parameters():
        fill_(p.data, reference_key(key, config), config, seed)
    return model.eval()

