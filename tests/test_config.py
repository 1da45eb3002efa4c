"""Zamba2Config: defaults, derived sizes, round trips, validation errors, long-context RoPE."""

import json
import math
from pathlib import Path

import pytest

from zamba2.config import Zamba2Config

FIXTURES = Path(__file__).parent / "fixtures"


def test_defaults_match_transformers():
    import transformers

    ours, ref = Zamba2Config(), transformers.Zamba2Config()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "mamba_d_state", "n_mamba_heads", "chunk_size",
                 "intermediate_size", "num_attention_heads", "num_key_value_heads", "adapter_rank", "num_mem_blocks",
                 "time_step_min", "time_step_max", "time_step_floor", "rms_norm_eps", "pad_token_id", "bos_token_id",
                 "eos_token_id", "attention_head_dim", "attention_hidden_size", "mamba_headdim", "hybrid_layer_ids",
                 "use_mem_rope", "use_shared_attention_adapter", "tie_word_embeddings",
                 "num_logits_to_keep"):  # fmt: skip
        assert getattr(ours, name) == getattr(ref, name), name
    assert ["mamba" if t == "linear_attention" else t for t in ref.layers_block_type] == ours.layers_block_type
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


def test_presets():
    c = Zamba2Config.preset("1.2b")
    assert (c.hidden_size, c.num_hidden_layers, c.hybrid_layer_ids) == (2048, 38, [5, 11, 17, 23, 29, 35])
    assert (c.mamba_d_state, c.n_mamba_heads, c.attention_head_dim, c.intermediate_size) == (128, 64, 128, 8192)
    c = Zamba2Config.preset("2.7b")
    assert c.hybrid_layer_ids == [6, 12, 18, 24, 30, 36, 42, 47, 51] and c.num_mem_blocks == 2
    c = Zamba2Config.preset("7b")
    assert (c.hidden_size, c.num_hidden_layers, len(c.hybrid_layer_ids)) == (3584, 81, 13)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Zamba2Config.preset("huge")


def test_round_trip_keeps_unknown_keys_and_writes_mamba_hybrid(tmp_path):
    data = Zamba2Config.preset("1.2b").to_dict()
    data.update(architectures=["Zamba2ForCausalLM"], torch_dtype="bfloat16", transformers_version="4.48.0")
    data["layers_block_type"] = ["linear_attention" if t == "mamba" else t for t in data["layers_block_type"]]
    del data["rope_parameters"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    config = Zamba2Config.from_json_file(path)
    assert config.extras["torch_dtype"] == "bfloat16" and config.extras["architectures"] == ["Zamba2ForCausalLM"]
    config.to_json_file(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert set(written["layers_block_type"]) == {"mamba", "hybrid"}
    assert written["torch_dtype"] == "bfloat16" and written["transformers_version"] == "4.48.0"
    assert Zamba2Config.from_dict(written) == config


def test_transformers_reads_our_config(tmp_path):
    import transformers

    Zamba2Config.preset("tiny", num_key_value_heads=2).save_pretrained(tmp_path)
    ref = transformers.Zamba2Config.from_pretrained(tmp_path)
    assert ref.hybrid_layer_ids == [1, 4] and ref.num_key_value_heads == 2
    assert ref.rope_parameters["rope_theta"] == 10000.0


def test_rope_parameters_spelling():
    c = Zamba2Config.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})
    assert c.rope_theta == 5000.0
    assert Zamba2Config.from_dict({"rope_theta": 20000}).rope_parameters["rope_theta"] == 20000.0


def test_long_context_rescales_rope():
    c = Zamba2Config.preset("1.2b", use_long_context=True)
    d = c.attention_head_dim
    assert c.max_position_embeddings == 16384
    assert math.isclose(c.rope_base, 10000.0 * 8 ** (d / (d - 2)))


def test_dt_limit():
    assert Zamba2Config().dt_limit == (0.001, math.inf)
    assert Zamba2Config(time_step_limit=(0.0, 1.0)).dt_limit == (0.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid"]), "layers_block_type has 2 entries"),
        (dict(num_hidden_layers=2, layers_block_type=["mamba", "attention"]), r"layers_block_type\[1\] is 'attention'"),
        (dict(hidden_size=30, n_mamba_heads=8), "n_mamba_heads"),
        (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
        (dict(n_mamba_heads=8, mamba_ngroups=3), "mamba_ngroups"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(mamba_d_state=-1), "mamba_d_state must be a positive integer"),
        (dict(hidden_act="gelu_fancy"), "hidden_act is 'gelu_fancy'"),
        (dict(num_attention_heads=7), "num_attention_heads"),
        (dict(problem_type="ranking"), "problem_type"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Zamba2Config(**kwargs)


def test_wrong_model_type_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        Zamba2Config.from_dict({"model_type": "llama"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Zamba2Config.from_json_file(bad)
