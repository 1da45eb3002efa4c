"""The transformers 5.23 oracle, for tests only: build a reference model and ours with the same weights."""

from __future__ import annotations

import warnings

import torch

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification

SMALL = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=5,
    layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"],
    mamba_d_state=8, n_mamba_heads=4, num_attention_heads=4, intermediate_size=64, adapter_rank=4, chunk_size=4,
)  # fmt: skip


def small_kwargs(**overrides) -> dict:
    kw = dict(SMALL, **overrides)
    if "layers_block_type" in overrides and "num_hidden_layers" not in overrides:
        kw["num_hidden_layers"] = len(kw["layers_block_type"])
    return kw


def reference_class(kind: str):
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*falling back.*")
    return {"lm": transformers.Zamba2ForCausalLM, "cls": transformers.Zamba2ForSequenceClassification}[kind]


def reference_config(**kw):
    import transformers

    kw = dict(kw)
    # transformers 5.23 has no time_step_limit field and spells RoPE base via rope_parameters
    kw.pop("time_step_limit", None)
    if "rope_theta" in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    return transformers.Zamba2Config(**kw)


def load_reference_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Copy the reference's weights into ours. The reference keeps tied copies of each shared block under
    every hybrid layer; ours registers each block once, so only our keys are taken."""
    ref_sd = ref.state_dict()
    ours_sd = ours.state_dict()
    missing = [k for k in ours_sd if k not in ref_sd]
    assert not missing, f"keys the reference does not have: {missing[:5]}"
    ours.load_state_dict({k: ref_sd[k] for k in ours_sd}, strict=True)


def make_pair(kind: str = "lm", seed: int = 0, **kw):
    """(reference model, our model, our config) with identical random weights, eval mode, fp32."""
    torch.manual_seed(seed)
    ref = reference_class(kind)(reference_config(**kw)).eval()
    ours_cls = {"lm": Zamba2ForCausalLM, "cls": Zamba2ForSequenceClassification}[kind]
    config = Zamba2Config(**kw)
    ours = ours_cls(config).eval()
    load_reference_weights(ours, ref)
    return ref, ours, config


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()
