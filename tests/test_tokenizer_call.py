"""The tokenizer call in transformers' conventions, checked against transformers' LlamaTokenizerFast built from the
same tokenizer.json: ids and masks for texts, batches, padding and truncation; batch_decode; BatchEncoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from zamba2.tokenizer import Tokenizer
from zamba2.tokenizer.batch import BatchEncoding, clean_up_tokenization_spaces

FIXTURE = Path(__file__).parent / "fixtures" / "mistral-v0.1-tokenizer.model"
TEXTS = [
    "What factors contributed to the fall of the Roman Empire?",
    "hi",
    "",
    "  two leading spaces and trailing   ",
    "héllo wörld 日本語 😀👍🏽",
    "a<s>b </s> c",
    "line one\nline two\n\n\ttabbed",
    "Hello , world . I 'm sure it 's fine , isn 't it ? Yes ! ' quoted '",
]
BATCHES = [TEXTS, TEXTS[:2], TEXTS[1:3], [TEXTS[4], TEXTS[0], TEXTS[7]]]
# (keyword arguments of the call) for each case compared; every case runs on every batch and on single texts.
CASES = [
    {},
    {"add_special_tokens": False},
    {"padding": True},
    {"padding": "longest", "padding_side": "right"},
    {"padding": "max_length", "max_length": 40},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "truncation": True, "max_length": 6},
    {"truncation": True, "max_length": 5, "add_special_tokens": False},
    {"max_length": 4},  # truncation implied by max_length without padding, as transformers does
    {"padding": "max_length", "truncation": True, "max_length": 7, "padding_side": "right"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """tokenizer.json (converted once from the Mistral v0.1 .model) with a pad token, the checkpoint layout."""
    sp = tmp_path_factory.mktemp("sp")
    shutil.copy(FIXTURE, sp / "tokenizer.model")
    root = tmp_path_factory.mktemp("json")
    Tokenizer.from_pretrained(sp).save_pretrained(root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["pad_token"] = "<unk>"
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def ours(folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


def reference(folder: Path, **kw) -> transformers.PreTrainedTokenizerBase:
    # Built from the file itself: from_pretrained in transformers 5.23 rebuilds a Llama tokenizer's
    # pre-tokenizer (Metaspace, prepend_scheme="first") instead of the file's normalizer (see the README).
    return transformers.LlamaTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<unk>", **kw)


@pytest.fixture(scope="module")
def ref(folder: Path):
    return reference(folder)


def as_lists(batch) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "token_type_ids"}


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_call_equals_llama_tokenizer_fast(ours: Tokenizer, ref, case: dict) -> None:
    inputs: list = [*BATCHES, *TEXTS[:3]]
    for text in inputs:
        for tensors in (None, "pt"):
            kw = dict(case, return_tensors=tensors)
            lengths = {len(row) for row in ref(text, **case)["input_ids"]} if not isinstance(text, str) else {1}
            ragged = tensors == "pt" and len(lengths) > 1
            if ragged:  # transformers refuses ragged rows as a tensor; so do we
                with pytest.raises(ValueError):
                    ref(text, **kw)
                with pytest.raises(ValueError, match="padding=True"):
                    ours(text, **kw)
                continue
            want, got = as_lists(ref(text, **kw)), as_lists(ours(text, **kw))
            assert got == want, f"{kw} {text!r}:\nours {got}\nref  {want}"


def test_truncation_side_and_eos(folder: Path, tmp_path: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(truncation_side="left", add_eos_token=True)
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = reference(folder, truncation_side="left", add_bos_token=True, add_eos_token=True)
    for kw in ({}, {"truncation": True, "max_length": 6}, {"padding": True, "truncation": True, "max_length": 9}):
        for text in (TEXTS[0], TEXTS[:3]):
            got, want = as_lists(ours(text, **kw)), as_lists(ref(text, **kw))
            assert got == want, f"{kw} {text!r}:\nours {got}\nref  {want}"


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("clean", [False, True, None])
def test_batch_decode_equals_llama_tokenizer_fast(ours: Tokenizer, ref, skip: bool, clean: bool | None) -> None:
    batch = ours(TEXTS, padding=True, return_tensors="pt")
    kw = {"skip_special_tokens": skip}
    if clean is not None:
        kw["clean_up_tokenization_spaces"] = clean
    got, want = ours.batch_decode(batch.input_ids, **kw), ref.batch_decode(batch.input_ids, **kw)
    assert got == want
    assert [ours.decode(row, **kw) for row in batch.input_ids] == [ref.decode(row, **kw) for row in batch.input_ids]
    if skip:
        assert got[: len(TEXTS)] != [""] * len(TEXTS)


def test_clean_up_rule(folder: Path, caplog) -> None:
    """The rule for non-BPE vocabularies; a BPE one (Zamba2's) ignores the flag with a warning, as transformers
    5.23 does, since the rule would remove spaces that are part of the text."""
    text = "Hello , world . I 'm sure it 's fine , is n't it ? Yes ! we 've you 're ' x"
    want = "Hello, world. I'm sure it's fine, isn't it? Yes! we've you're'x"
    assert clean_up_tokenization_spaces(text) == want
    ours = Tokenizer.from_pretrained(folder)
    with caplog.at_level("WARNING", logger="zamba2.tokenizer"):
        assert ours.decode(ours.encode(text), clean_up_tokenization_spaces=True) == "<s> " + text
    assert "clean_up_tokenization_spaces=True is ignored" in caplog.text


def test_batch_encoding_attributes_and_to(ours: Tokenizer) -> None:
    batch = ours(TEXTS[:2], padding=True, return_tensors="pt")
    assert isinstance(batch, BatchEncoding) and isinstance(batch, dict)
    assert batch.input_ids is batch["input_ids"] and batch.attention_mask.shape == batch.input_ids.shape
    assert batch.to("cpu") is batch and batch.to(torch.device("cpu")).input_ids.device.type == "cpu"
    assert sorted({**batch}) == ["attention_mask", "input_ids"]
    with pytest.raises(AttributeError, match="token_type_ids"):
        batch.token_type_ids  # noqa: B018
    lists = ours(TEXTS[:2])
    assert lists.to("cpu").input_ids == lists["input_ids"]  # lists stay lists


def test_encode_return_tensors_and_pad_token_setter(folder: Path, ours: Tokenizer, ref) -> None:
    assert ours.encode(TEXTS[0], return_tensors="pt").tolist() == ref.encode(TEXTS[0], return_tensors="pt").tolist()
    tok = Tokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token  # the usual transformers idiom
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok(["hi", "a b c"], padding=True).input_ids[0][:2] == [2, 2]


def test_unsupported_arguments_are_named(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="return_tensors='np' is not supported; use 'pt'"):
        ours("hi", return_tensors="np")
    with pytest.raises(ValueError, match="padding='maximum'"):
        ours("hi", padding="maximum")
    with pytest.raises(TypeError, match="return_offsets_mapping=True is not supported: use tokenizer.backend"):
        ours("hi", return_offsets_mapping=True)
    with pytest.raises(TypeError, match="text_pair is not supported"):
        ours("hi", "there")
    with pytest.raises(TypeError, match="unexpected argument paddding=True"):
        ours("hi", paddding=True)
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        ours(["hi", "there you"], padding="max_length")
    # no-op values of transformers arguments are accepted
    assert ours("hi", return_attention_mask=True, return_token_type_ids=False).input_ids == [1, 12014]
