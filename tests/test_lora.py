"""LoRA (zamba2/train/lora.py): identity at init, merge/unmerge, per-use adapters on shared blocks, PEFT's format
both ways against peft on transformers 5.23's Zamba2, and the bad-input errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from zamba2.config import Zamba2Config
from zamba2.layers.attention import SharedAttention
from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification, Zamba2Model
from zamba2.train import lora

transformers.logging.set_verbosity_error()

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 1, 88, 23], [0, 0, 0, 4, 5, 6, 7, 8, 9, 10]])
MASK = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])

# name -> (num_mem_blocks, layer types); "repeated" has blocks serving two hybrid layers each.
LAYOUTS = {
    "single-use": (2, ["mamba", "hybrid", "mamba", "hybrid", "mamba"]),
    "repeated": (2, ["mamba", "hybrid", "hybrid", "mamba", "hybrid", "hybrid"]),
    "one-block": (1, ["hybrid", "mamba", "hybrid", "mamba"]),
}


def tiny(layout: str = "repeated", **kw) -> dict:
    nmb, types = LAYOUTS[layout]
    return dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=len(types), layers_block_type=types, mamba_d_state=8,
        n_mamba_heads=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, num_mem_blocks=nmb,
        use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True, chunk_size=4, pad_token_id=0,
    ) | kw  # fmt: skip


def ours(layout: str = "repeated", cls=Zamba2ForCausalLM, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(Zamba2Config(**tiny(layout, **kw))).eval()


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomise(named_params, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero B (and fresh A) so an adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name or name.endswith("score.weight") or "score.modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fresh_adapter_is_identity(layout, monkeypatch):
    model = ours(layout)
    monkeypatch.setattr(SharedAttention, "split_projections", False)  # exact: both sides take the same path
    base = out(model)
    paths = lora.add_lora(model, rank=4, alpha=8)
    d = maxdiff(out(model), base)
    assert d == 0.0, f"B = 0 adapter changed the logits by {d}"
    monkeypatch.undo()
    d = maxdiff(out(model), base)
    assert d < 1e-5, d
    n_hybrid = sum(t == "hybrid" for t in LAYOUTS[layout][1])
    assert sum(p.endswith("shared_transformer.self_attn.q_proj") for p in paths) == n_hybrid


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_and_unmerge(layout):
    model = ours(layout)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4, alpha=16)
    # (larger factors make the tiny random model chaotic: then fp32 itself is off by 2e-5 from fp64)
    randomise(model.named_parameters(), std=0.05)
    unmerged = out(model)
    assert maxdiff(unmerged, out(ours(layout))) > 1e-3  # the adapter does something
    kept = lora.merge_lora(model)
    # A block serving several hybrid layers keeps its per-use adapters active; single-use blocks merge too.
    repeated = layout != "single-use"
    assert bool(kept) == repeated and all("shared_transformer" in p for p in kept), kept
    merged = out(model)
    d, scale = maxdiff(merged, unmerged), unmerged.abs().max().item()
    assert d < 1e-6 * scale, f"merged vs unmerged forward: {d} (logits up to {scale})"
    changed = [k for k, v in model.state_dict().items() if k in base_weights and not torch.equal(v, base_weights[k])]
    assert any("mamba.in_proj.weight" in k for k in changed)
    lora.unmerge_lora(model)
    worst = max(maxdiff(model.state_dict()[k], v) for k, v in base_weights.items())
    assert worst < 1e-6, f"unmerge left base weights off by {worst}"
    assert maxdiff(out(model), unmerged) < 1e-6 * scale


def test_only_adapters_train():
    model = ours().train()
    paths = lora.add_lora(model, rank=2, alpha=4, dropout=0.1)
    names = [n for n, _ in lora.trainable_parameters(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(paths)
    randomise(model.named_parameters())
    loss = model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora.trainable_parameters(model))
    # dropout acts in training only
    with torch.no_grad():
        a, b = model(IDS).logits, model(IDS).logits
        assert maxdiff(a, b) > 0
        model.eval()
        assert maxdiff(model(IDS).logits, model(IDS).logits) == 0


def test_classifier_saves_score_and_bf16_keeps_fp32_factors():
    clf = ours(cls=Zamba2ForSequenceClassification, num_labels=3)
    lora.add_lora(clf, rank=4, alpha=8)
    names = [n for n, _ in lora.trainable_parameters(clf)]
    assert "score.weight" in names
    assert "base_model.model.score.weight" in lora.adapter_state_dict(clf)
    model = ours().to(torch.bfloat16)
    lora.add_lora(model, rank=4, alpha=8)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert model(IDS).logits.dtype == torch.bfloat16


def test_per_use_adapters_are_distinct():
    """num_mem_blocks = 2 with each block used twice: four hybrid layers, four (A, B) pairs per shared linear,
    registered inside the two blocks, keyed by hybrid ordinal, named per hybrid layer as PEFT names them."""
    model = ours("repeated")
    paths = lora.add_lora(model, rank=4, alpha=8, targets=["q_proj"])
    hybrid = model.config.hybrid_layer_ids
    assert paths == [f"model.layers.{i}.shared_transformer.self_attn.q_proj" for i in hybrid]
    owner = hybrid[0]
    q = model.model.layers[owner].shared_transformer.self_attn.q_proj
    assert sorted(q.lora_A) == ["0", "2"]
    sd = lora.adapter_state_dict(model)
    assert len({t.data_ptr() for t in sd.values()}) == len(sd) == 8
    # One use only: the other uses of that block run the base linear alone.
    model = ours("repeated")
    base = out(model)
    target = f"layers.{hybrid[2]}.shared_transformer.self_attn.q_proj"
    assert lora.add_lora(model, rank=4, alpha=8, targets=[target]) == [f"model.{target}"]
    assert maxdiff(out(model), base) < 1e-5


# ---- PEFT's format, both ways --------------------------------------------------------------------


def peft_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


@pytest.mark.parametrize("kind", ["lm", "cls"])
@pytest.mark.parametrize("layout", ["repeated", "one-block"])
def test_peft_loads_our_adapter(tmp_path, layout, kind):
    cls = Zamba2ForCausalLM if kind == "lm" else Zamba2ForSequenceClassification
    model = ours(layout, cls=cls, **({"num_labels": 3} if kind == "cls" else {}))
    model.save_pretrained(tmp_path / "base")
    lora.add_lora(model, rank=4, alpha=8)
    randomise(model.named_parameters())
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("CAUSAL_LM" if kind == "lm" else "SEQ_CLS") and cfg["peft_type"] == "LORA"
    ref_cls = transformers.Zamba2ForCausalLM if kind == "lm" else transformers.Zamba2ForSequenceClassification
    ref = ref_cls.from_pretrained(tmp_path / "base").eval()
    pm = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    d = maxdiff(peft_out(pm), out(model))
    assert d < 1e-4, f"peft on transformers vs ours, same adapter: {d}"


@pytest.mark.parametrize(
    "kind,layout,targets",
    [
        ("lm", "repeated", lora.DEFAULT_TARGETS),
        ("lm", "single-use", ["linear", "mamba.in_proj", "layers.4.shared_transformer.self_attn.k_proj"]),
        ("cls", "repeated", lora.DEFAULT_TARGETS),
    ],
)
def test_we_load_peft_adapter(tmp_path, kind, layout, targets):
    extra = {"num_labels": 3} if kind == "cls" else {}
    torch.manual_seed(3)
    ref_cls = transformers.Zamba2ForCausalLM if kind == "lm" else transformers.Zamba2ForSequenceClassification
    ref = ref_cls(transformers.Zamba2Config(**tiny(layout, **extra))).eval()
    ref.save_pretrained(tmp_path / "base")
    task = peft.TaskType.CAUSAL_LM if kind == "lm" else peft.TaskType.SEQ_CLS
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type=task))
    randomise(pm.named_parameters())
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    cls = Zamba2ForCausalLM if kind == "lm" else Zamba2ForSequenceClassification
    model = cls.from_pretrained(tmp_path / "base", progress=False).eval()
    paths = lora.load_adapter(model, tmp_path / "adapter")
    assert not lora.trainable_parameters(model)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(paths) * 2 == sum(".lora_" in k for k in saved)
    d = maxdiff(out(model), peft_out(pm))
    assert d < 1e-4, f"ours vs peft on transformers, peft's adapter: {d}"
    # and back: what we save equals what peft saved, key for key
    lora.save_adapter(model, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(saved)
    assert max(maxdiff(again[k], saved[k]) for k in saved) == 0


def test_bare_backbone_paths(tmp_path):
    torch.manual_seed(0)
    model = Zamba2Model(Zamba2Config(**tiny())).eval()
    paths = lora.add_lora(model, rank=2, alpha=2, targets=["in_proj"])
    assert paths[0] == "layers.0.mamba.in_proj"
    lora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=0, alpha=8), "rank must be an integer >= 1"),
        (dict(rank=2.5, alpha=8), "rank must be an integer >= 1"),
        (dict(rank=4, alpha=float("nan")), "alpha must be a finite number"),
        (dict(rank=4, alpha=8, dropout=1.0), "dropout must be in"),
        (dict(rank=4, alpha=8, targets=[]), "non-empty list"),
        (dict(rank=4, alpha=8, targets=["q_proj", "nope"]), "'nope' match no module"),
        (dict(rank=4, alpha=8, targets=["nope"]), "match no linear layer"),
        (dict(rank=4, alpha=8, targets=["mamba"]), "a Mamba2Mixer; only linear layers"),
        (dict(rank=4, alpha=8, targets=["conv1d"]), "a Conv1d; only linear layers"),
        (dict(rank=4, alpha=8, targets="(unclosed"), "not a valid regular expression"),
    ],
)
def test_add_lora_errors(kwargs, message):
    model = ours()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lora.add_lora(model, **kwargs)
    assert not lora.has_lora(model)


def test_add_twice_and_no_adapter():
    model = ours()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.adapter_state_dict(model)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        lora.save_adapter(model, "/nonexistent")
    lora.add_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, rank=2, alpha=2)


def test_load_state_dict_strict():
    model = ours()
    lora.add_lora(model, rank=2, alpha=2, targets=["in_proj"])
    sd = dict(lora.adapter_state_dict(model))
    key = next(iter(sd))
    with pytest.raises(ValueError, match=f"missing 1 key\\(s\\): {key}"):
        lora.load_adapter_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="1 unexpected key\\(s\\): base_model.model.extra"):
        lora.load_adapter_state_dict(model, dict(sd, **{"base_model.model.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=f"{key} has shape \\(3, 32\\), the model expects \\(2, 32\\)"):
        lora.load_adapter_state_dict(model, dict(sd, **{key: torch.zeros(3, 32)}))


@pytest.fixture
def adapter(tmp_path):
    model = ours()
    lora.add_lora(model, rank=2, alpha=2)
    lora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_dora": True}, "use_dora = True is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern = .* is not supported"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"r": "4"}, "r must be an integer"),
        ({"r": None}, "missing field 'r'"),
        ({"task_type": "SEQ_CLS"}, "task_type is 'SEQ_CLS', but the model is a Zamba2ForCausalLM"),
        ({"r": 3}, "has shape \\(2, 32\\), the model expects \\(3, 32\\)"),
    ],
)
def test_bad_adapter_config(adapter, change, message):
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(change)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(ours(), adapter)


def test_bad_adapter_files(adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        lora.load_adapter(ours(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.load_adapter(ours(), tmp_path)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        lora.load_adapter(ours(), adapter)


def test_pickle_only_and_corrupt_weights(adapter):
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(str(weights))
    weights.unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickles are never loaded"):
        lora.load_adapter(ours(), adapter)
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lora.load_adapter(ours(), adapter)
    save_file(sd, str(weights))
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora.load_adapter(ours(), adapter)


def test_quantize_leaves_lora_linears_alone():
    from zamba2.quant.model import default_quantize_filter

    wrapped = lora.LoraLinear(torch.nn.Linear(256, 512), r=4, scaling=2.0, dropout=0.0)
    assert default_quantize_filter("model.layers.0.mamba.in_proj", torch.nn.Linear(256, 512))
    assert not default_quantize_filter("model.layers.0.mamba.in_proj", wrapped)
    assert not default_quantize_filter("model.layers.0.mamba.in_proj.lora_B", torch.nn.Linear(256, 512))


# ---- applying an adapter: from_pretrained, the CLI, the server -----------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved base checkpoint (the CLI's tiny model with its tokenizer) and a random adapter for it."""
    from helpers_cli import make_model_folder

    root = tmp_path_factory.mktemp("lora")
    base = make_model_folder(root / "base")
    model = Zamba2ForCausalLM.from_pretrained(base, progress=False)
    lora.add_lora(model, rank=4, alpha=8)
    randomise(model.named_parameters(), std=0.05)
    lora.save_adapter(model, root / "adapter", base_model_name_or_path=str(base))
    return base, root / "adapter", model.eval()


def test_from_pretrained_with_adapter(trained):
    base, adapter, model = trained
    loaded = Zamba2ForCausalLM.from_pretrained(base, adapter=adapter, progress=False)
    assert lora.has_lora(loaded) and not lora.trainable_parameters(loaded)
    d = maxdiff(out(loaded), out(model))
    assert d == 0, f"from_pretrained(adapter=) vs the model that saved it: {d}"
    assert maxdiff(out(loaded), out(Zamba2ForCausalLM.from_pretrained(base, progress=False))) > 1e-3
    # the cached decode path carries the adapters too: prefill + one step == full forward
    with torch.no_grad():
        full = loaded(IDS).logits[:, -1]
        cache = loaded(IDS[:, :-1], use_cache=True).past_key_values
        step = loaded(IDS[:, -1:], past_key_values=cache).logits[:, -1]
    assert maxdiff(step, full) < 1e-5, maxdiff(step, full)


def test_classifier_from_pretrained_with_adapter(tmp_path):
    clf = ours(cls=Zamba2ForSequenceClassification, num_labels=3)
    clf.save_pretrained(tmp_path / "base")
    lora.add_lora(clf, rank=2, alpha=4, targets=["in_proj"])
    randomise(clf.named_parameters())
    lora.save_adapter(clf, tmp_path / "adapter")
    again = Zamba2ForSequenceClassification.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert maxdiff(out(again), out(clf)) == 0
    with pytest.raises(ValueError, match="task_type is 'SEQ_CLS', but the model is a Zamba2ForCausalLM"):
        Zamba2ForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter", progress=False)


def test_quantize_with_adapter(tmp_path):
    """quantize= with adapter=: adapters merge into the float weights, then those quantise; per-use adapters on
    a block serving several hybrid layers stay in float beside the quantised base."""
    from zamba2.quant import QuantizedLinear

    model = ours("repeated", hidden_size=256, intermediate_size=256, n_mamba_heads=8)
    model.save_pretrained(tmp_path / "base")
    lora.add_lora(model, rank=4, alpha=8)
    randomise(model.named_parameters(), std=0.02)
    lora.save_adapter(model, tmp_path / "adapter")
    q = Zamba2ForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter", quantize="int8")
    assert isinstance(q.model.layers[0].mamba.in_proj, QuantizedLinear)
    assert isinstance(q.model.layers[1].shared_transformer.self_attn.q_proj, lora.SlotLoraLinear)
    ref, got = out(model), out(q)
    d, scale = maxdiff(got, ref), ref.abs().max().item()
    assert d < 0.05 * scale, f"int8 + merged adapter vs float + adapter: {d} (logits up to {scale})"
    plain = Zamba2ForCausalLM.from_pretrained(tmp_path / "base", quantize="int8")
    assert maxdiff(out(plain), ref) > 2 * d  # the adapter is there


def test_cli_generate_with_adapter(trained, capsys):
    from zamba2 import cli
    from zamba2.tokenizer import Tokenizer

    base, adapter, model = trained
    tok = Tokenizer.from_pretrained(base)
    prompt = "The quick brown fox"
    code = cli.main(["generate", "--model", str(base), "--adapter", str(adapter), "--max-new-tokens", "6", prompt])
    got, err = capsys.readouterr()
    assert code == 0, err
    ids = tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=[2])[0, len(ids) :].tolist()
    assert got == tok.decode(new, skip_special_tokens=True) + "\n"
    for bad, needle in ((base / "nope", "not a folder"), (base, "no adapter_config.json")):
        code = cli.main(["generate", "--model", str(base), "--adapter", str(bad), "x"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_serve_loads_adapter(trained):
    from zamba2.serve.app import build_parser, create_app

    base, adapter, model = trained
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", str(base), "--adapter", str(base)])
    args = build_parser().parse_args(["--model", str(base), "--adapter", str(adapter), "--device", "cpu"])
    server = create_app(args).state.server
    server.load()
    try:
        assert server.error is None, server.error
        assert maxdiff(out(server.engine.model), out(model)) == 0
    finally:
        server.engine.stop()


@pytest.mark.parametrize("layout", ["single-use", "repeated"])
def test_merged_checkpoint_for_transformers(tmp_path, layout):
    """merge_and_unload + save_pretrained: an ordinary checkpoint that transformers loads with the adapter's
    logits; a model still carrying adapters (per-use ones on a shared block used twice) refuses to save."""
    model = ours(layout)
    lora.add_lora(model, rank=4, alpha=8)
    randomise(model.named_parameters(), std=0.05)
    with_adapter = out(model)
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        model.save_pretrained(tmp_path)
    kept = lora.merge_and_unload(model)
    if kept:
        with pytest.raises(ValueError, match="carries LoRA adapters"):
            model.save_pretrained(tmp_path)
        return
    assert not lora.has_lora(model)
    model.save_pretrained(tmp_path)
    ref = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path).eval()
    d, scale = maxdiff(peft_out(ref), with_adapter), with_adapter.abs().max().item()
    assert d < 1e-5 * scale, f"transformers on the merged checkpoint vs ours with the adapter: {d}"


def test_gradient_checkpointing_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = ours().train()
        lora.add_lora(model, rank=2, alpha=4)
        randomise(model.named_parameters(), std=0.05)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in lora.trainable_parameters(model)})
    worst = max(maxdiff(grads[0][n], grads[1][n]) for n in grads[0])
    assert worst < 1e-6, f"LoRA gradients with vs without gradient checkpointing: {worst}"
