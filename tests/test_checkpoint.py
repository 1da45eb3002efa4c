"""Checkpoints: interop with transformers 5.23 save/load, layouts, errors, hub resolution, dtype."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zamba2 import checkpoint as ckpt
from zamba2.checkpoint import files as ckpt_files
from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification, Zamba2Model

transformers.logging.set_verbosity_error()

VOCAB = 128
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 1, 88, 23, 11, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def tiny(nmb: int, **kw) -> dict:
    """A tiny Zamba2 config (MHA: the 5.23 reference crashes with GQA + attention adapters)."""
    types = ["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"]
    return dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, layers_block_type=types, mamba_d_state=8,
        n_mamba_heads=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        num_mem_blocks=nmb, use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        chunk_size=8,
        **kw,
    )  # fmt: skip


def reference(nmb: int, seed: int = 0, **kw) -> transformers.Zamba2ForCausalLM:
    torch.manual_seed(seed)
    return transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**tiny(nmb, **kw))).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def load(folder, cls=Zamba2ForCausalLM, **kw):
    return ckpt.load_pretrained(cls, folder, progress=False, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """transformers 5.23 checkpoints: {(nmb, sharded): (folder, reference logits)}."""
    out = {}
    for nmb in (1, 2):
        ref = reference(nmb)
        for sharded in (False, True):
            folder = tmp_path_factory.mktemp(f"tf-nmb{nmb}-{'sharded' if sharded else 'single'}")
            ref.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
            out[nmb, sharded] = (folder, logits(ref))
    return out


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_single(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(folder / "model.safetensors"))


# ---- interop with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("nmb", [1, 2])
def test_loads_transformers_checkpoint(saved, nmb, sharded):
    folder, ref_logits = saved[nmb, sharded]
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    model = load(folder)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    close(logits(model), ref_logits)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("nmb", [1, 2])
def test_transformers_loads_ours(tmp_path, nmb, sharded):
    torch.manual_seed(1)
    ours = Zamba2ForCausalLM(Zamba2Config(**tiny(nmb))).eval()
    ckpt.save_pretrained(ours, tmp_path, max_shard_size="20KB" if sharded else "5GB")
    ref = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path).eval()
    close(logits(ref), logits(ours))
    close(logits(load(tmp_path)), logits(ours), atol=0)


def test_model_classmethods(saved, tmp_path):
    """The documented entry points on the model classes go through this module."""
    folder, ref_logits = saved[2, True]
    model = Zamba2ForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    close(logits(model), ref_logits)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    clf = Zamba2ForSequenceClassification.from_pretrained(tmp_path, num_labels=4, progress=False)
    assert clf.score.weight.shape == (4, 32) and clf.config.num_labels == 4


def test_save_format(tmp_path):
    torch.manual_seed(2)
    model = Zamba2ForCausalLM(Zamba2Config(**tiny(2)))
    ckpt.save_pretrained(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(state)  # de-duplicated names, tied lm_head omitted
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name in shards:
        with safe_open(tmp_path / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["layers_block_type"]) == {"mamba", "hybrid"}
    assert config["model_type"] == "zamba2" and config["architectures"] == ["Zamba2ForCausalLM"]
    assert config["dtype"] == "float32"
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

    # Saving again as one file removes the shards and the index of the earlier save.
    ckpt.save_pretrained(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]


def test_untied_lm_head_round_trip(saved, tmp_path):
    # transformers 5.23 also unties the shared blocks when tie_word_embeddings is false (each hybrid layer
    # gets its own block), so the reference here is a tied model given a separate output head.
    folder = copy_folder(saved[1, False][0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    head = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(3)) * 0.02
    write_single(folder, {**load_file(folder / "model.safetensors"), "lm_head.weight": head})
    ref = transformers.Zamba2ForCausalLM.from_pretrained(saved[1, False][0]).eval()
    with torch.no_grad():
        expected = ref.model(IDS).last_hidden_state @ head.T

    model = load(folder)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    close(logits(model), expected)
    ckpt.save_pretrained(model, tmp_path / "ours")
    assert torch.equal(load_file(tmp_path / "ours" / "model.safetensors")["lm_head.weight"], head)
    close(logits(load(tmp_path / "ours")), expected)


def test_tied_lm_head_stored_anyway(saved, tmp_path):
    folder = copy_folder(saved[1, False][0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    write_single(folder, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    close(logits(load(folder)), saved[1, False][1])  # identical copy: ignored

    write_single(folder, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match=r"'lm_head.weight' differs from 'model.embed_tokens.weight'.*tie_"):
        load(folder)


def test_repeated_shared_blocks(saved, tmp_path):
    """Fine-tuned/merged checkpoints store the shared block again under every hybrid layer."""
    folder = copy_folder(saved[2, False][0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    hybrid = [1, 3, 5]
    repeated = dict(tensors)
    for j, layer in enumerate(hybrid[2:], start=2):
        owner = hybrid[j % 2]
        for k, v in tensors.items():
            if k.startswith(f"model.layers.{owner}.shared_transformer."):
                repeated[k.replace(f"layers.{owner}.", f"layers.{layer}.")] = v
    assert len(repeated) > len(tensors)
    write_single(folder, repeated)
    close(logits(load(folder)), saved[2, False][1])

    key = "model.layers.5.shared_transformer.self_attn.q_proj.weight"
    repeated[key] = repeated[key] + 1e-3
    write_single(folder, repeated)
    with pytest.raises(ValueError, match=rf"copies differ: '{key}' != 'model.layers.1.shared_transformer"):
        load(folder)


def test_extra_state_ignored(saved, tmp_path, caplog):
    folder = copy_folder(saved[1, False][0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    extra = "model.layers.1.shared_transformer.self_attn.q_proj._extra_state"
    write_single(folder, {**tensors, extra: torch.zeros(3, dtype=torch.uint8)})
    with caplog.at_level(logging.DEBUG, logger="zamba2.checkpoint"):
        close(logits(load(folder)), saved[1, False][1])
    assert extra in caplog.text


def test_classifier_from_causal_lm(saved, caplog):
    folder, _ = saved[1, False]
    with caplog.at_level(logging.WARNING, logger="zamba2.checkpoint"):
        labels = {"id2label": {0: "a", 1: "b", 2: "c"}}
        clf = load(folder, Zamba2ForSequenceClassification, config_overrides=labels)
    assert "score.weight is not in the checkpoint" in caplog.text
    assert clf.config.num_labels == 3 and clf.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert clf.score.weight.shape == (3, 32) and clf.score.weight.abs().sum() > 0
    lm = load(folder)
    torch.testing.assert_close(clf.model.embed_tokens.weight, lm.model.embed_tokens.weight, atol=0, rtol=0)


def test_classifier_round_trip_with_transformers(tmp_path):
    torch.manual_seed(4)
    config = transformers.Zamba2Config(**tiny(2), num_labels=3)
    ref = transformers.Zamba2ForSequenceClassification(config).eval()
    ref.save_pretrained(tmp_path)
    clf = load(tmp_path, Zamba2ForSequenceClassification)
    close(logits(clf), logits(ref))
    ckpt.save_pretrained(clf, tmp_path / "ours")
    again = transformers.Zamba2ForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    close(logits(again), logits(ref))


def test_base_model_from_causal_lm(saved):
    folder, _ = saved[1, False]
    base = load(folder, Zamba2Model)
    lm = load(folder)
    with torch.no_grad():
        h = base(IDS).last_hidden_state
        close(lm.lm_head(h), logits(lm), atol=1e-6)


# ---- dtype -----------------------------------------------------------------------------------------


def test_dtype_auto_and_names(saved, tmp_path):
    folder = copy_folder(saved[1, False][0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert load(folder).dtype == torch.float32  # nothing stored: float32
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    model = load(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    close(logits(model), saved[1, False][1], atol=0.05)
    assert load(folder, dtype="fp16").dtype == torch.float16
    assert load(folder, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; expected 'auto'"):
        load(folder, dtype="int8")
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float64"}))
    with pytest.raises(ValueError, match=r"config.json dtype 'float64'"):
        load(folder)


def test_parse_size():
    assert ckpt.parse_size("5GB") == 5 * 10**9
    assert ckpt.parse_size("200MB") == 200 * 10**6
    assert ckpt.parse_size("20KB") == 20_000
    assert ckpt.parse_size("1GiB") == 2**30
    assert ckpt.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size 'lots'"):
        ckpt.parse_size("lots")


# ---- errors ----------------------------------------------------------------------------------------


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return copy_folder(saved[1, False][0], tmp_path / "m")


def test_config_errors(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"m/config.json: file not found"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config.json: not valid JSON"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"m/config.json: model_type is 'llama'; expected 'zamba2'"):
        ckpt.read_config(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "zamba2", "hidden_size": -1}))
    with pytest.raises(ValueError, match=r"m/config.json: hidden_size must be a positive integer"):
        ckpt.read_config(folder)


def test_unknown_override(folder):
    with pytest.raises(ValueError, match="config override 'num_lables' is not a Zamba2Config field"):
        load(folder, config_overrides={"num_lables": 3})


def test_no_weights_and_pickles(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors and no model.safetensors.index.json"):
        load(folder)
    (folder / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"found adapter.safetensors, but none named by an index"):
        load(folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*never unpickled") as err:
        load(folder)
    assert "weights_only=True" in str(err.value) and "save_file" in str(err.value)


def test_index_errors(saved, tmp_path):
    folder = copy_folder(saved[1, True][0], tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.json lists shard '{shard}', which is missing"):
        load(folder)

    folder = copy_folder(saved[1, True][0], tmp_path / "m2")
    key, first = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != first)
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: other}}))
    with pytest.raises(ValueError, match=rf"places tensor '{key}' in {other}, which lacks it"):
        load(folder)
    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index.json: expected a 'weight_map'"):
        load(folder)


def test_corrupt_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"m/model.safetensors: not a valid safetensors file"):
        load(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"m/model.safetensors: not a valid safetensors file"):
        load(folder)


def test_missing_unexpected_and_shape(folder):
    tensors = load_file(folder / "model.safetensors")
    gone = "model.layers.3.mamba_decoder.mamba.dt_bias"
    write_single(folder, {k: v for k, v in tensors.items() if k != gone})
    with pytest.raises(ValueError, match=rf"m: the checkpoint lacks 1 tensors the model needs: {gone}"):
        load(folder)

    write_single(folder, {**tensors, "model.layers.0.mamba.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 tensors do not belong to this model.*layers.0.mamba.bogus"):
        load(folder)

    key = "model.layers.0.mamba.in_proj.weight"
    write_single(folder, {**tensors, key: torch.zeros(7, 32)})
    message = rf"model.safetensors: tensor '{key}' has shape \[7, 32\] but the model expects \[148, 32\]"
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_missing_score_only_for_classifier(folder):
    tensors = load_file(folder / "model.safetensors")
    write_single(folder, {k: v for k, v in tensors.items() if k != "model.final_layernorm.weight"})
    with pytest.raises(ValueError, match="lacks 1 tensors the model needs: model.final_layernorm.weight"):
        load(folder, Zamba2ForSequenceClassification)


# ---- hub -------------------------------------------------------------------------------------------


def test_local_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such folder, and it does not look like a hub id"):
        ckpt.resolve_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file"):
        ckpt.resolve_model_dir(tmp_path / "file")


def test_hub_download_monkeypatched(saved, monkeypatch):
    folder, ref_logits = saved[1, False]
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(folder)

    monkeypatch.setattr(ckpt_files, "snapshot_download", fake)
    model = load("zyphra/tiny", revision="v1")
    close(logits(model), ref_logits)
    repo, kw = calls[0]
    assert repo == "zyphra/tiny" and kw["revision"] == "v1"
    wanted = {"config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"}
    assert wanted <= set(kw["allow_patterns"])
    assert "*.bin" not in kw["allow_patterns"]
    assert Zamba2Config.from_pretrained("zyphra/tiny").hidden_size == 32
    assert calls[-1][1]["allow_patterns"] == ["config.json", "generation_config.json"]


def test_hub_error_is_wrapped(monkeypatch):
    def fail(repo_id, **kw):
        raise RuntimeError("404 Repository Not Found")

    monkeypatch.setattr(ckpt_files, "snapshot_download", fail)
    with pytest.raises(OSError, match=r"zyphra/missing@main: not a local folder.*RuntimeError: 404"):
        load("zyphra/missing", revision="main")


def test_offline_fake_cache(saved, tmp_path, monkeypatch):
    """Real huggingface_hub, HF_HUB_OFFLINE=1, a cache laid out as huggingface_hub writes it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--zyphra--tiny"
    shutil.copytree(saved[1, True][0], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = ckpt.resolve_model_dir("zyphra/tiny", cache_dir=tmp_path / "cache")
    assert folder == repo / "snapshots" / sha
    close(logits(load("zyphra/tiny", cache_dir=tmp_path / "cache")), saved[1, True][1])
    with pytest.raises(OSError, match=r"zyphra/other: not a local folder.*HF_HUB_OFFLINE is set"):
        ckpt.resolve_model_dir("zyphra/other", cache_dir=tmp_path / "cache")


# ---- quantised loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_on_load_and_round_trip(tmp_path, mode):
    from zamba2 import quant

    config = Zamba2Config(**{**tiny(1), "hidden_size": 256, "vocab_size": 256, "num_attention_heads": 8})
    config.num_key_value_heads = 8
    torch.manual_seed(6)
    model = Zamba2ForCausalLM(config).eval()
    ckpt.save_pretrained(model, tmp_path / "float")
    quant.quantize_model(model, mode)  # the same layers quantised in memory: the expected result
    expected = logits(model, IDS % 256)

    loaded = load(tmp_path / "float", quantize=mode)
    assert isinstance(loaded.lm_head, quant.QuantizedLinear)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32  # the tied embedding stays float
    close(logits(loaded, IDS % 256), expected, atol=0)

    ckpt.save_pretrained(loaded, tmp_path / "quantized")
    stored = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert stored["mode"] == mode and "lm_head" in stored["modules"]
    again = load(tmp_path / "quantized")
    close(logits(again, IDS % 256), expected, atol=0)
    assert again.lm_head.scales.dtype == torch.float32  # buffers keep their dtype under dtype="bf16" too
    assert load(tmp_path / "quantized", dtype="bf16").lm_head.scales.dtype == torch.float32

    with pytest.raises(ValueError, match="already quantised"):
        load(tmp_path / "quantized", quantize=mode)
    with pytest.raises(ValueError, match=r"quantize='int3'; expected None or one of int8, int4"):
        load(tmp_path / "float", quantize="int3")
