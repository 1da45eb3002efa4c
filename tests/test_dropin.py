"""Drop-in for code written against transformers: its documented Zamba2 examples, with only the import line
changed, run against tiny checkpoints in a local hub cache (HF_HOME in a temp folder, HF_HUB_OFFLINE=1, the
cache laid out as huggingface_hub lays it out), so hub ids resolve for real without network. The same examples
run with transformers 5.23 in a second process are the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_cli import CHAT_TEMPLATE
from hub_cache import add_snapshot
from test_tokenizer_call import FIXTURE

import zamba2
from zamba2 import checkpoint as ckpt
from zamba2.config import Zamba2Config
from zamba2.generation_config import GenerationConfig
from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification
from zamba2.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
LM_ID, DOC_LM_ID, CLS_ID = "Zyphra/Zamba2-7B", "Zyphra/Zamba2-7B-v1", "tiny-org/zamba2-classifier"
CHAT_ID = "Zyphra/Zamba2-7B-Instruct-v2"
# MHA: transformers 5.23 crashes with GQA + attention adapters, and it is the oracle here.
TINY = dict(num_key_value_heads=4)

# The documented examples, verbatim (transformers' Zamba2 page and docstrings; `{checkpoint}` filled in).
QUICK_START = """\
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM

tokenizer = AutoTokenizer.from_pretrained("Zyphra/Zamba2-7B")
model = AutoModelForCausalLM.from_pretrained("Zyphra/Zamba2-7B", device_map="auto", dtype=torch.bfloat16)

input_text = "What factors contributed to the fall of the Roman Empire?"
inputs = tokenizer(input_text, return_tensors="pt").to(model.device)

outputs = model.generate(**inputs, max_new_tokens=100)
print(tokenizer.decode(outputs[0]))
"""
CONFIGURATION = """\
from transformers import Zamba2Model, Zamba2Config
# Initializing a Zamba2-2.7B style configuration
configuration = Zamba2Config()
# Initializing a model from the Zamba2-2.7B style configuration
model = Zamba2Model(configuration)
# Accessing the model configuration
configuration = model.config
"""
GENERATION = """\
from transformers import AutoTokenizer, Zamba2ForCausalLM

model = Zamba2ForCausalLM.from_pretrained("Zyphra/Zamba2-7B-v1")
tokenizer = AutoTokenizer.from_pretrained("Zyphra/Zamba2-7B-v1")

prompt = "Hey, are you conscious? Can you talk to me?"
inputs = tokenizer(prompt, return_tensors="pt")

# Generate
generate_ids = model.generate(inputs.input_ids, max_length=30)
tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
"""
SINGLE_LABEL = """\
import torch
from transformers import AutoTokenizer, Zamba2ForSequenceClassification

tokenizer = AutoTokenizer.from_pretrained("{checkpoint}")
model = Zamba2ForSequenceClassification.from_pretrained("{checkpoint}")

inputs = tokenizer("Hello, my dog is cute", return_tensors="pt")

with torch.no_grad():
    logits = model(**inputs).logits

predicted_class_id = logits.argmax().item()
model.config.id2label[predicted_class_id]

# To train a model on `num_labels` classes, you can pass `num_labels=num_labels` to `.from_pretrained(...)`
num_labels = len(model.config.id2label)
model = Zamba2ForSequenceClassification.from_pretrained("{checkpoint}", num_labels=num_labels)

labels = torch.tensor([1])
loss = model(**inputs, labels=labels).loss
round(loss.item(), 2)
"""
MULTI_LABEL = """\
import torch
from transformers import AutoTokenizer, Zamba2ForSequenceClassification

tokenizer = AutoTokenizer.from_pretrained("{checkpoint}")
model = Zamba2ForSequenceClassification.from_pretrained("{checkpoint}", problem_type="multi_label_classification")

inputs = tokenizer("Hello, my dog is cute", return_tensors="pt")

with torch.no_grad():
    logits = model(**inputs).logits

predicted_class_ids = torch.arange(0, logits.shape[-1])[torch.sigmoid(logits).squeeze(dim=0) > 0.5]

# To train a model on `num_labels` classes, you can pass `num_labels=num_labels` to `.from_pretrained(...)`
num_labels = len(model.config.id2label)
model = Zamba2ForSequenceClassification.from_pretrained(
    "{checkpoint}", num_labels=num_labels, problem_type="multi_label_classification"
)

labels = torch.sum(
    torch.nn.functional.one_hot(predicted_class_ids[None, :].clone(), num_classes=num_labels), dim=1
).to(torch.float)
loss = model(**inputs, labels=labels).loss
"""
# The Zyphra instruct model card's transformers snippet ("Load model directly").
MODEL_CARD_CHAT = """\
from transformers import AutoTokenizer, AutoModelForCausalLM

tokenizer = AutoTokenizer.from_pretrained("Zyphra/Zamba2-7B-Instruct-v2")
model = AutoModelForCausalLM.from_pretrained("Zyphra/Zamba2-7B-Instruct-v2", device_map="auto")
messages = [
    {"role": "user", "content": "Who are you?"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
    return_tensors="pt",
).to(model.device)

outputs = model.generate(**inputs, max_new_tokens=40)
print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[-1]:]))
"""
EXAMPLES = {
    "quick_start": dict(source=QUICK_START, keep=["outputs"]),
    "configuration": dict(source=CONFIGURATION, keep=[], meta=True),
    "generation": dict(source=GENERATION, keep=["generate_ids"]),
    "model_card_chat": dict(source=MODEL_CARD_CHAT, keep=["outputs"]),
    "single_label": dict(source=SINGLE_LABEL.replace("{checkpoint}", CLS_ID), keep=["logits", "loss", "num_labels"]),
    "multi_label": dict(
        source=MULTI_LABEL.replace("{checkpoint}", CLS_ID), keep=["logits", "predicted_class_ids", "loss"]
    ),
}  # fmt: skip


def staged(folder: Path, cls, seed: int, **overrides) -> Path:
    """A random tiny checkpoint (fp32) with the Mistral v0.1 tokenizer, as a hub repository holds it."""
    torch.manual_seed(seed)
    cls(Zamba2Config.preset("tiny", **TINY, **overrides)).eval().save_pretrained(folder)
    spm = folder.parent / f"{folder.name}-spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(FIXTURE.read_bytes())
    tokenizer = Tokenizer.from_pretrained(spm)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """$HF_HOME with hub/ holding the causal LM under the two documented ids and a 2-label classifier."""
    root = tmp_path_factory.mktemp("stage")
    home = tmp_path_factory.mktemp("hf_home")
    lm = staged(root / "lm", Zamba2ForCausalLM, seed=0)
    labels = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}
    classifier = staged(root / "cls", Zamba2ForSequenceClassification, seed=1, **labels)
    for repo_id, folder in ((LM_ID, lm), (DOC_LM_ID, lm), (CHAT_ID, lm), (CLS_ID, classifier)):
        add_snapshot(home / "hub", repo_id, folder)
    return home


def run_examples(hf_home: Path, tmp_path: Path, library: str) -> dict:
    """Each example with its import line from `library`, in a fresh process with HF_HOME and HF_HUB_OFFLINE=1."""
    spec = {
        name: {**e, "source": e["source"].replace("from transformers import", f"from {library} import")}
        for name, e in EXAMPLES.items()
    }
    spec_path, out_path = tmp_path / f"{library}-spec.json", tmp_path / f"{library}-out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "run_examples.py"), str(spec_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{library} examples failed:\n{proc.stderr[-4000:]}"
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def results(hf_home: Path, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("runs")
    return {lib: run_examples(hf_home, out, lib) for lib in ("zamba2", "transformers")}


def snapshot(hf_home: Path, repo_id: str) -> Path:
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def test_quick_start(results: dict, hf_home: Path) -> None:
    """The quick start resolves the hub id offline and prints what our own API gives on the snapshot folder."""
    ours = results["zamba2"]["quick_start"]
    folder = snapshot(hf_home, LM_ID)
    model = Zamba2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    tok = Tokenizer.from_pretrained(folder)
    ids = torch.tensor([tok.encode("What factors contributed to the fall of the Roman Empire?")])
    want = model.generate(ids, torch.ones_like(ids), max_new_tokens=100)
    assert ours["outputs"] == want.tolist()
    assert ours["stdout"] == tok.decode(want[0]) + "\n"
    assert len(ours["outputs"][0]) == ids.shape[1] + 100 or ours["outputs"][0][-1] == 2


def test_configuration_example_builds_the_same_model(results: dict) -> None:
    ours, ref = results["zamba2"]["configuration"], results["transformers"]["configuration"]
    assert ours["num_parameters"] == ref["num_parameters"], (ours["num_parameters"], ref["num_parameters"])


def test_generation_example_equals_transformers(results: dict) -> None:
    ours, ref = results["zamba2"]["generation"], results["transformers"]["generation"]
    assert ours["generate_ids"] == ref["generate_ids"], f"\nours {ours['generate_ids']}\nref  {ref['generate_ids']}"
    assert ours["_"] == ref["_"] and len(ours["generate_ids"][0]) <= 30


def test_model_card_chat_example_equals_transformers(results: dict) -> None:
    ours, ref = results["zamba2"]["model_card_chat"], results["transformers"]["model_card_chat"]
    assert ours["outputs"] == ref["outputs"], f"\nours {ours['outputs']}\nref  {ref['outputs']}"
    assert ours["stdout"] == ref["stdout"] and ours["stdout"].strip()


@pytest.mark.parametrize("name", ["single_label", "multi_label"])
def test_classification_examples_equal_transformers(results: dict, name: str) -> None:
    ours, ref = results["zamba2"][name], results["transformers"][name]
    diff = (torch.tensor(ours["logits"]) - torch.tensor(ref["logits"])).abs().max().item()
    assert diff < 1e-4, f"logits differ by {diff}: ours {ours['logits']} ref {ref['logits']}"
    assert abs(ours["loss"] - ref["loss"]) < 1e-4, (ours["loss"], ref["loss"])
    if name == "single_label":
        assert ours["_"] == ref["_"] and ours["num_labels"] == ref["num_labels"] == 2
        assert results["zamba2"][name]["stdout"] == ""
    else:
        assert ours["predicted_class_ids"] == ref["predicted_class_ids"]


# ---- the pieces, in process --------------------------------------------------------------------------------


def test_auto_names_are_our_classes() -> None:
    assert zamba2.AutoTokenizer is Tokenizer
    assert zamba2.AutoModelForCausalLM is Zamba2ForCausalLM
    assert zamba2.AutoModelForSequenceClassification is Zamba2ForSequenceClassification
    assert zamba2.AutoConfig is Zamba2Config and zamba2.AutoModel is zamba2.Zamba2Model


def test_tokenizer_hub_id_revision_cache_dir_offline(hf_home: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = hf_home / "hub"
    folder = snapshot(hf_home, LM_ID)
    local = Tokenizer.from_pretrained(folder)
    commit = folder.name
    for kw in ({}, {"revision": commit}, {"revision": "main"}):
        tok = Tokenizer.from_pretrained(LM_ID, cache_dir=cache, **kw)
        assert Path(tok.source) == folder
        assert tok.encode("Hello world") == local.encode("Hello world")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        Tokenizer.from_pretrained("nobody/missing", cache_dir=cache)
    with pytest.raises(OSError, match=f"{LM_ID}@v9"):
        Tokenizer.from_pretrained(LM_ID, cache_dir=cache, revision="v9")
    # The model's loader reads the same snapshot, and its generation_config.json.
    model = Zamba2ForCausalLM.from_pretrained(LM_ID, cache_dir=cache, progress=False)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0


def test_device_map_and_torch_dtype(hf_home: Path) -> None:
    folder = snapshot(hf_home, LM_ID)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    for kw, device, dtype in [
        ({"device_map": "auto"}, auto, torch.float32),
        ({"device_map": "cpu", "torch_dtype": torch.bfloat16}, "cpu", torch.bfloat16),
        ({"device_map": {"": "cpu"}, "dtype": "float16"}, "cpu", torch.float16),
        ({"device_map": torch.device("cpu"), "torch_dtype": "bfloat16", "dtype": torch.bfloat16}, "cpu",
         torch.bfloat16),
    ]:  # fmt: skip
        model = Zamba2ForCausalLM.from_pretrained(folder, progress=False, **kw)
        assert model.device.type == device and model.dtype == dtype, kw
    with pytest.raises(ValueError, match="several devices .*tensor-parallel"):
        Zamba2ForCausalLM.from_pretrained(folder, device_map={"model.layers.0": "cpu", "lm_head": "cuda:1"})
    with pytest.raises(ValueError, match="torch_dtype is the older name of dtype"):
        Zamba2ForCausalLM.from_pretrained(folder, dtype="float16", torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device_map value 'tpu7'"):
        Zamba2ForCausalLM.from_pretrained(folder, device_map="tpu7")
    with pytest.raises(ValueError, match="disagree"):
        Zamba2ForCausalLM.from_pretrained(folder, device="cpu", device_map="cuda:3")
    with pytest.raises(TypeError, match="load_in_8bit=True is not supported: use quantize='int8'"):
        Zamba2ForCausalLM.from_pretrained(folder, load_in_8bit=True)
    with pytest.raises(TypeError, match="unexpected argument dtpye="):
        Zamba2ForCausalLM.from_pretrained(folder, dtpye="bfloat16")
    # no-op values of transformers arguments pass
    Zamba2ForCausalLM.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=True, progress=False)


@pytest.fixture(scope="module")
def lm(hf_home: Path) -> Zamba2ForCausalLM:
    return Zamba2ForCausalLM.from_pretrained(snapshot(hf_home, LM_ID), progress=False)


def test_generate_transformers_keywords(lm: Zamba2ForCausalLM, hf_home: Path) -> None:
    tok = Tokenizer.from_pretrained(snapshot(hf_home, LM_ID))
    inputs = tok(["Hello there", "A longer prompt than that"], padding=True, return_tensors="pt")
    base = lm.generate(**inputs, max_new_tokens=6)
    out = lm.generate(**inputs, max_new_tokens=6, num_beams=1, use_cache=True, num_return_sequences=1,
                      return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    assert torch.equal(out.sequences, base) and len(out.scores) == len(out.logits) == 6
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), base[:, -6:])  # greedy picks the top score
    # min_new_tokens: end of sequence is held back; make eos the greedy choice to see it
    eos = int(base[0, -6])
    held = lm.generate(**inputs, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos, pad_token_id=0)
    free = lm.generate(**inputs, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert free[0, -6] == eos and (held[0, -6:-3] != eos).all()
    # max_length counts the prompt, as in transformers
    assert lm.generate(**inputs, max_length=inputs.input_ids.shape[1] + 2).shape[1] == inputs.input_ids.shape[1] + 2
    for kw, match in [
        ({"num_beams": 4}, "num_beams=4 is not supported: beam search"),
        ({"typical_p": 0.9}, "typical_p=0.9 is not supported: use top_p or min_p"),
        ({"num_return_sequences": 3}, "input_ids.repeat"),
        ({"max_new_tokns": 3}, "unexpected argument max_new_tokns=3"),
    ]:
        with pytest.raises(TypeError, match=match):
            lm.generate(**inputs, **kw)
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        lm.generate(**tok("Hello there"))  # lists, not tensors


def test_generation_config_defaults(lm: Zamba2ForCausalLM, tmp_path: Path, caplog) -> None:
    ids = torch.tensor([[1, 22557, 1526]])
    greedy = lm.generate(ids, max_new_tokens=5)
    assert greedy.shape == (1, 8)
    saved = lm.generation_config
    try:
        lm.generation_config = GenerationConfig(max_new_tokens=3, do_sample=True, top_k=1, eos_token_id=[])
        assert torch.equal(lm.generate(ids, seed=0), greedy[:, :6])  # top_k=1 sampling = greedy; 3 new tokens
        assert lm.generate(ids, max_new_tokens=4).shape == (1, 7)  # the call wins over the config
        explicit = GenerationConfig(max_length=5)
        assert lm.generate(ids, generation_config=explicit).shape == (1, 5)
    finally:
        lm.generation_config = saved
    # generation_config.json: known keys checked, unknown kept, ones that matter warned about
    folder = tmp_path / "ckpt"
    lm.save_pretrained(folder)
    data = json.loads((folder / "generation_config.json").read_text())
    data.update(temperature=0.7, do_sample=True, num_beams=4, transformers_version="4.48.0")
    (folder / "generation_config.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="zamba2.generation"):
        loaded = Zamba2ForCausalLM.from_pretrained(folder, progress=False)
    assert "num_beams=4 is not supported" in caplog.text and "transformers_version" not in caplog.text
    gen = loaded.generation_config
    assert (gen.temperature, gen.do_sample, gen.eos_token_id) == (0.7, True, 2)
    loaded.save_pretrained(folder)
    again = json.loads((folder / "generation_config.json").read_text())
    assert again["temperature"] == 0.7 and again["num_beams"] == 4 and again["eos_token_id"] == 2
    (folder / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: top_k must be int"):
        Zamba2ForCausalLM.from_pretrained(folder, progress=False)


def test_resolve_device_names(monkeypatch) -> None:
    from zamba2.checkpoint.load import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, "auto") == torch.device("cuda")
    assert resolve_device(None, 1) == torch.device("cuda", 1)
    assert resolve_device(None, {"": 0, "lm_head": 0}) == torch.device("cuda", 0)
    assert resolve_device(None, "cuda:2") == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, "auto") == torch.device("cpu") == resolve_device(None, "balanced")
    assert resolve_device(None, None) == torch.device("cpu") == resolve_device("cpu", "auto")
    assert ckpt.resolve_dtype("bfloat16") == torch.bfloat16
