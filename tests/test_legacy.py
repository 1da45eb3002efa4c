"""The original (legacy) Zamba2 format: config conversion, key map, and loading against transformers 5.23."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from zamba2 import checkpoint as ckpt
from zamba2.config import Zamba2Config
from zamba2.legacy import convert_legacy_config, is_legacy_config, legacy_key_map
from zamba2.model import Zamba2ForCausalLM

transformers.logging.set_verbosity_error()

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-zamba2-1.2b-config.json"
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 1, 88, 23, 11, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def legacy_1_2b() -> dict:
    return json.loads(FIXTURE.read_text())


# ---- config ----------------------------------------------------------------------------------------


def test_real_1_2b_config_converts():
    d = legacy_1_2b()
    assert is_legacy_config(d)
    config = Zamba2Config.from_dict(convert_legacy_config(d))
    assert config.hidden_size == 2048 and config.num_hidden_layers == 38
    assert config.hybrid_layer_ids == [5, 11, 17, 23, 29, 35]
    assert config.mamba_d_state == 128 and config.mamba_d_conv == 4 and config.mamba_expand == 2
    assert config.n_mamba_heads == 64 and config.mamba_headdim == 64 and config.mamba_ngroups == 1
    assert config.use_shared_attention_adapter and config.adapter_rank == 128
    assert config.use_mem_rope and config.intermediate_size == 8192
    assert config.num_attention_heads == config.num_key_value_heads == 32 and config.num_mem_blocks == 1
    # Ignored keys survive in extras (written back on save); derived ones are dropped.
    assert {"sliding_window", "use_mamba_kernels", "torch_dtype"} <= set(config.extras)
    assert (
        not {"kv_channels", "num_query_groups", "mamba_headdim", "ft_lora", "lora_rank"}
        & config.extras.keys()
    )
    # Matches the published 1.2B preset on every architectural field.
    preset = Zamba2Config.preset("1.2b")
    for name in ("layers_block_type", "mamba_d_state", "n_mamba_heads", "intermediate_size", "adapter_rank"):
        assert getattr(config, name) == getattr(preset, name), name


def test_read_config_converts_legacy(tmp_path):
    (tmp_path / "config.json").write_text(FIXTURE.read_text())
    config = ckpt.read_config(tmp_path)
    assert config.n_mamba_heads == 64
    assert ckpt.resolve_dtype("auto", config) == torch.bfloat16  # torch_dtype of the legacy config


def test_is_legacy_config():
    assert is_legacy_config({"layers_block_type": ["m", "g"]})
    assert is_legacy_config({"state_size": 16})
    assert not is_legacy_config(Zamba2Config.preset("tiny").to_dict())


def test_misspelt_adapter_flag_and_num_query_groups():
    d = {**legacy_1_2b(), "se_shared_attention_lora": False}
    del d["use_shared_attention_lora"], d["num_key_value_heads"]
    d["num_query_groups"] = 8
    out = convert_legacy_config(d)
    assert out["use_shared_attention_adapter"] is False and out["num_key_value_heads"] == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_shared_block_lora": False}, "'use_shared_block_lora' is False; this architecture needs true"),
        ({"gated_linear_unit": False}, "'gated_linear_unit' is False; this architecture needs true"),
        ({"ft_lora": True}, "'ft_lora' is true"),
        ({"mamba_headdim": 96}, r"mamba_headdim \(96\) does not divide expansion_factor \* hidden_size"),
        ({"mamba_d_state": 64}, r"sets 'mamba_d_state' twice, to 64 and to 128 \(from 'state_size'\)"),
        ({"layers_block_type": ["m", "x"] + ["m"] * 36}, r"layers_block_type\[1\] is 'x'; expected 'm'"),
    ],
)
def test_config_errors(change, message):
    d = {**legacy_1_2b(), **change}
    if "mamba_d_state" in change:  # make the modern key come first so the legacy one collides with it
        d = {"mamba_d_state": 64, **legacy_1_2b()}
    with pytest.raises(ValueError, match=message):
        convert_legacy_config(d)


def test_config_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**legacy_1_2b(), "ft_lora": True}))
    with pytest.raises(ValueError, match=r"config.json: legacy config key 'ft_lora'"):
        ckpt.read_config(tmp_path)


# ---- key map ---------------------------------------------------------------------------------------


def small_legacy_config(nmb: int) -> Zamba2Config:
    return Zamba2Config(**tiny(nmb))


def test_key_map_renames_and_drops():
    config = small_legacy_config(2)  # hybrids at 1, 3, 5; block 0 serves 0 and 2, block 1 serves 1
    keys = [
        "model.embed_tokens.weight",
        "model.mamba_layers.0.input_layernorm.weight",
        "model.mamba_layers.1.input_layernorm.weight",
        "model.mamba_layers.1.mamba.in_proj.0.weight",
        "model.mamba_layers.2.mamba.A_log",
        "model.linear_layers.2.weight",
        "model.blocks.1.self_attn.o_proj.weight",
        "model.blocks.1.feed_forward.linear_fc1.weight",
        "model.blocks.1.self_attn.linear_k_lora_B_list.1.weight",
        "model.blocks.1.self_attn.linear_k_lora_B_list.2.weight",  # unused: slot 2 runs block 0
        "model.blocks.0.feed_forward.linear_fc1_lora_A_list.2.weight",
        "model.blocks.0.self_attn.q_proj._extra_state",
    ]
    mapping, dropped = legacy_key_map(keys, config)
    assert mapping == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight": "model.mamba_layers.0.input_layernorm.weight",
        "model.layers.1.mamba_decoder.input_layernorm.weight": "model.mamba_layers.1.input_layernorm.weight",
        "model.layers.1.mamba_decoder.mamba.in_proj.weight": "model.mamba_layers.1.mamba.in_proj.0.weight",
        "model.layers.2.mamba.A_log": "model.mamba_layers.2.mamba.A_log",
        "model.layers.5.linear.weight": "model.linear_layers.2.weight",
        "model.layers.3.shared_transformer.self_attn.o_proj.weight": "model.blocks.1.self_attn.o_proj.weight",
        "model.layers.3.shared_transformer.feed_forward.gate_up_proj.weight": "model.blocks.1.feed_forward.linear_fc1.weight",  # noqa: E501
        "model.layers.3.shared_transformer.self_attn.linear_k_adapter_list.1.1.weight": "model.blocks.1.self_attn.linear_k_lora_B_list.1.weight",  # noqa: E501
        "model.layers.1.shared_transformer.feed_forward.gate_up_proj_adapter_list.2.0.weight": "model.blocks.0.feed_forward.linear_fc1_lora_A_list.2.weight",  # noqa: E501
    }
    assert dropped == [
        "model.blocks.1.self_attn.linear_k_lora_B_list.2.weight",
        "model.blocks.0.self_attn.q_proj._extra_state",
    ]


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.mamba_layers.0.mamba.x_proj.weight", "unknown legacy tensor 'model.mamba_layers.0.mamba.x_p"),
        ("model.blocks.0.self_attn.linear_qkv.weight", "unknown legacy tensor 'model.blocks.0.self_attn.lin"),
        ("model.something.weight", "unknown legacy tensor 'model.something.weight'"),
        ("model.mamba_layers.6.input_layernorm.weight", r"layer 6 is out of range \(the config has 6\)"),
        ("model.linear_layers.3.weight", r"hybrid layer 3 is out of range \(the config has 3\)"),
        ("model.blocks.2.input_layernorm.weight", r"shared block 2 is out of range \(the config has 2\)"),
        ("model.blocks.0.self_attn.linear_q_lora_A_list.3.weight", r"adapter slot 3 is out of range"),
    ],
)
def test_key_map_errors(key, message):
    with pytest.raises(ValueError, match=message):
        legacy_key_map(["model.embed_tokens.weight", key], small_legacy_config(2))


def test_key_map_duplicate_target():
    keys = ["model.mamba_layers.0.mamba.in_proj.0.weight", "model.mamba_layers.0.mamba.in_proj.weight"]
    with pytest.raises(ValueError, match="both map to 'model.layers.0.mamba.in_proj.weight'"):
        legacy_key_map(keys, small_legacy_config(1))


# ---- loading a legacy checkpoint built from a transformers 5.23 reference --------------------------


def tiny(nmb: int) -> dict:
    """Tiny config in our/transformers names; MHA because the 5.23 reference crashes with GQA + adapters."""
    types = ["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"]
    return dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=6, layers_block_type=types, mamba_d_state=8,
        n_mamba_heads=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        num_mem_blocks=nmb, use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        chunk_size=8,
    )  # fmt: skip


def legacy_config(c: dict) -> dict:
    """The reverse of convert_legacy_config, in the style of the published legacy config.json."""
    return {
        "model_type": "zamba2", "architectures": ["Zamba2ForCausalLM"], "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"], "num_hidden_layers": c["num_hidden_layers"],
        "layers_block_type": ["g" if t == "hybrid" else "m" for t in c["layers_block_type"]],
        "state_size": c["mamba_d_state"], "conv_dimension": 4, "expansion_factor": 2,
        "mamba_headdim": 2 * c["hidden_size"] // c["n_mamba_heads"],
        "ffn_hidden_size": c["intermediate_size"],
        "num_attention_heads": c["num_attention_heads"], "num_query_groups": c["num_key_value_heads"],
        "kv_channels": c["hidden_size"] // c["num_attention_heads"], "num_mem_blocks": c["num_mem_blocks"],
        "use_shared_attention_lora": c["use_shared_attention_adapter"], "lora_rank": c["adapter_rank"],
        "use_shared_block_lora": True, "gated_linear_unit": True, "ft_lora": False, "use_mem_rope": True,
        "rope_theta": 10000, "chunk_size": c["chunk_size"], "sliding_window": None, "use_mamba_kernels": True,
        "torch_dtype": "float32", "add_bias_linear": False,
    }  # fmt: skip


MAMBA = re.compile(r"model\.layers\.(\d+)\.(?:mamba_decoder\.)?(input_layernorm\.weight|mamba\..+)")
ADAPTER = re.compile(
    r"(self_attn\.linear_[qkv]|feed_forward\.gate_up_proj)_adapter_list\.(\d+)\.([01])\.weight"
)


def to_legacy(state: dict[str, torch.Tensor], c: dict, in_proj_0: bool) -> dict[str, torch.Tensor]:
    """Published names -> legacy names, adding the unused adapter entries every legacy block holds."""
    hybrid = [i for i, t in enumerate(c["layers_block_type"]) if t == "hybrid"]
    nmb = c["num_mem_blocks"]
    block_of = {hybrid[b]: b for b in range(nmb)}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if m := MAMBA.fullmatch(key):
            name = m[2].replace("in_proj.weight", "in_proj.0.weight") if in_proj_0 else m[2]
            out[f"model.mamba_layers.{m[1]}.{name}"] = t
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.linear\.weight", key):
            out[f"model.linear_layers.{hybrid.index(int(m[1]))}.weight"] = t
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.shared_transformer\.(.+)", key):
            b, rest = block_of[int(m[1])], m[2]
            rest = rest.replace("feed_forward.gate_up_proj.", "feed_forward.linear_fc1.")
            rest = rest.replace("feed_forward.down_proj.", "feed_forward.linear_fc2.")
            if a := ADAPTER.fullmatch(rest):
                base = a[1].replace("gate_up_proj", "linear_fc1")
                side = "A" if a[3] == "0" else "B"
                out[f"model.blocks.{b}.{base}_lora_{side}_list.{a[2]}.weight"] = t
                for k in range(len(hybrid)):  # every legacy block stores a slot per hybrid layer
                    if k % nmb != b:  # ... never used by this block
                        out[f"model.blocks.{b}.{base}_lora_{side}_list.{k}.weight"] = torch.randn_like(t)
            else:
                out[f"model.blocks.{b}.{rest}"] = t
        else:
            out[key] = t
    return out


@pytest.mark.parametrize(
    "nmb, in_proj_0, with_lm_head", [(1, True, False), (2, False, True)], ids=["nmb1-in_proj.0", "nmb2-lm"]
)
def test_load_legacy_matches_reference(tmp_path, nmb, in_proj_0, with_lm_head):
    torch.manual_seed(nmb)
    c = tiny(nmb)
    ref = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**c)).eval()
    ref.save_pretrained(tmp_path / "published")
    from safetensors.torch import load_file

    published = load_file(tmp_path / "published" / "model.safetensors")
    # Legacy files may keep A_log in bf16: round the reference the same way so both see the same values.
    for key in [k for k in published if k.endswith("A_log")]:
        published[key] = published[key].to(torch.bfloat16)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("A_log"):
                p.copy_(p.to(torch.bfloat16).float())
        expected = ref(IDS).logits
    legacy = to_legacy(published, c, in_proj_0)
    if with_lm_head:
        legacy["lm_head.weight"] = legacy["model.embed_tokens.weight"]
    assert any(".lora_A_list." in k or "_lora_A_list." in k for k in legacy)
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(legacy_config(c)))
    save_file({k: v.contiguous().clone() for k, v in legacy.items()}, str(folder / "model.safetensors"))

    model = ckpt.load_pretrained(Zamba2ForCausalLM, folder, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-4, rtol=0)

    # Saved again, it is an ordinary (published-format) checkpoint.
    ckpt.save_pretrained(model, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["layers_block_type"] == c["layers_block_type"] and "state_size" not in config
    again = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-4, rtol=0)


def test_folder_with_both_layouts(tmp_path):
    """A repository holding both layouts: the files whose names match config.json's format are used."""
    torch.manual_seed(5)
    c = tiny(1)
    ours = Zamba2ForCausalLM(Zamba2Config(**c)).eval()
    ckpt.save_pretrained(ours, tmp_path, max_shard_size="20KB")  # new layout: shards + index
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    legacy = {k: v * 0 for k, v in to_legacy(state, c, in_proj_0=False).items()}  # different weights
    save_file({k: v.contiguous().clone() for k, v in legacy.items()}, str(tmp_path / "model.safetensors"))

    model = ckpt.load_pretrained(Zamba2ForCausalLM, tmp_path, progress=False)
    assert torch.equal(model.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    (tmp_path / "config.json").write_text(json.dumps(legacy_config(c)))
    model = ckpt.load_pretrained(Zamba2ForCausalLM, tmp_path, progress=False)
    assert model.model.embed_tokens.weight.abs().sum() == 0


def test_unknown_legacy_tensor_names_the_file(tmp_path):
    c = tiny(1)
    (tmp_path / "config.json").write_text(json.dumps(legacy_config(c)))
    tensors = {"model.embed_tokens.weight": torch.zeros(128, 32), "model.blocks.0.router.w": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"model.safetensors: unknown legacy tensor 'model.blocks.0.router.w'"
    ):
        ckpt.load_pretrained(Zamba2ForCausalLM, tmp_path, progress=False)
