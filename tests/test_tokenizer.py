"""Tokenizer: SentencePiece parity (sentencepiece as oracle), config files, chat template, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zamba2.tokenizer import StreamDecoder, Tokenizer, read_sentencepiece_model

FIXTURE = Path(__file__).parent / "fixtures" / "mistral-v0.1-tokenizer.model"
KNOWN_TEXT = "What factors contributed to the fall of the Roman Empire?"
KNOWN_IDS = [1824, 8612, 18746, 298, 272, 2949, 302, 272, 8325, 13657, 28804]

CORPUS = (
    [
        KNOWN_TEXT,
        "",
        " ",
        "Hello, world!",
        "  two leading spaces and trailing   ",
        "héllo wörld, ça va? Ñandú, Ærøskøbing, naïve café",
        "日本語のテキストと中文字符、한국어 문장",
        "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷",
        "digits 0123456789 3.14159 1,000,000 -42 1e-9",
        "line one\nline two\n\n\ttabbed\r\nwindows",
        "mixed\u00a0nbsp\u200bzero-width\u2028sep",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽 ∑∫√ ①②",
        "code: def f(x):\n    return {'a': [1, 2]}  # comment",
        "a" * 300,
        "Ünïcödé ŝtrïng with combining e\u0301 and ﬁ ligature",
        "\x01\x7f control chars",
    ]
    + [f"w{' ' * n}z" for n in range(1, 34)]
    + ["\n" * n + "x" for n in range(1, 4)]
)

CHATML = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = {
    "32000": {"content": "<|im_start|>", "special": True},
    "32001": {"content": "<|im_end|>", "special": True},
}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a Roman emperor."},
]


@pytest.fixture(scope="module")
def sp():
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(FIXTURE))


def make_folder(root: Path, config: dict | None = None, source: Path = FIXTURE, **files: str) -> Path:
    """A checkpoint-like folder: `source` (a .model or tokenizer.json) plus the given config files."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, root / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (root / name.replace("__", ".")).write_text(text)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_folder(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def tokenizer_json(tok: Tokenizer, tmp_path_factory) -> Path:
    """tokenizer.json saved from the converted model: loads much faster than converting again."""
    folder = tmp_path_factory.mktemp("json")
    tok.save_pretrained(folder)
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> Tokenizer:
    config = {"chat_template": CHATML, "added_tokens_decoder": CHAT_TOKENS, "pad_token": None}
    return Tokenizer.from_pretrained(make_folder(tmp_path_factory.mktemp("chat"), config))


# --- SentencePiece parity ----------------------------------------------------------------------------------


def test_model_file_reader() -> None:
    model = read_sentencepiece_model(FIXTURE)
    assert len(model.pieces) == 32000
    assert model.pieces[:3] == [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    assert model.pieces[3][0] == "<0x00>" and model.pieces[3][2] == 6
    assert (model.model_type, model.byte_fallback) == (2, True)
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (0, 1, 2, -1)
    assert model.add_dummy_prefix and not model.remove_extra_whitespaces


def test_known_encoding(tok: Tokenizer) -> None:
    assert tok.encode(KNOWN_TEXT, add_special_tokens=False) == KNOWN_IDS
    assert tok.encode(KNOWN_TEXT) == [1, *KNOWN_IDS]
    assert tok.decode(KNOWN_IDS) == KNOWN_TEXT
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, None)
    assert tok.vocab_size == 32000


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_matches_sentencepiece(tok: Tokenizer, sp, text: str) -> None:
    expected = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.decode(expected) == sp.decode(expected) == text


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.one_of(
            st.sampled_from(list("ab xyz  \n\t.,'?!0123456789éüß漢字かナ한😀🎉\u0301\u200d▁")),
            st.characters(codec="utf-8"),
        ),
        max_size=40,
    )
)
def test_random_text_matches_sentencepiece(tok: Tokenizer, sp, text: str) -> None:
    assume(not any(t in text for t in ("<s>", "</s>", "<unk>")))  # those are special tokens here
    expected = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.decode(expected) == sp.decode(expected)


def test_decode_matches_sentencepiece_around_control_tokens(tok: Tokenizer, sp) -> None:
    ids = [1, *sp.encode("  indented"), 2, *sp.encode("next")]
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == sp.decode(ids)
    # Like transformers: special tokens are kept by default and matched in text.
    assert tok.decode([1, *KNOWN_IDS[:2]]) == "<s> What factors"
    assert tok.encode("<s>x", add_special_tokens=False)[0] == 1


# --- loading, config, batching -----------------------------------------------------------------------------


def test_tokenizer_json_round_trip_and_transformers_agree(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert again.encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:12]:
        assert reference(text).input_ids == tok.encode(text)
        ids = tok.encode(text)
        assert reference.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_config_and_special_tokens_map(tmp_path: Path, tokenizer_json: Path) -> None:
    config = {"add_bos_token": False, "add_eos_token": True, "pad_token": {"content": "<unk>"}}
    folder = make_folder(
        tmp_path, config, tokenizer_json, special_tokens_map__json=json.dumps({"eos_token": "<s>"})
    )
    tok = Tokenizer.from_pretrained(folder)
    assert tok.encode("hi") == [12014, 1]  # eos comes from special_tokens_map.json
    assert tok.pad_token_id == 0
    batch = tok(["hi", "What factors"], padding=True, padding_side="right", return_tensors="pt")
    assert batch["input_ids"].tolist() == [[12014, 1, 0], [1824, 8612, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_batch_left_padding_uses_eos_when_no_pad(tok: Tokenizer) -> None:
    batch = tok(["hi", KNOWN_TEXT], padding=True, return_tensors="pt")
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0].tolist() == [2] * 10 + [1, 12014]
    assert batch["attention_mask"][0].tolist() == [0] * 10 + [1, 1]
    assert batch["input_ids"][1].tolist() == [1, *KNOWN_IDS]
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["hi", KNOWN_TEXT]
    assert tok("hi", return_tensors="pt")["input_ids"].tolist() == [[1, 12014]]
    assert tok("hi")["input_ids"] == [1, 12014]
    with pytest.raises(ValueError, match="padding_side"):
        tok("hi", padding_side="middle")


def test_errors_name_the_file_or_key(tmp_path: Path, tok: Tokenizer, tokenizer_json: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    bad = make_folder(tmp_path / "bad", {"add_bos_token": "yes"}, tokenizer_json)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: add_bos_token"):
        Tokenizer.from_pretrained(bad)
    missing = make_folder(tmp_path / "missing", {"pad_token": "<pad>"}, tokenizer_json)
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocabulary"):
        Tokenizer.from_pretrained(missing)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(ValueError, match="garbage"):
        Tokenizer.from_pretrained(tmp_path / "garbage")
    unigram = tmp_path / "unigram.model"
    unigram.write_bytes(b"\x0a\x03\x0a\x01a" + b"\x12\x02\x18\x01")  # one piece, trainer_spec.model_type=1
    with pytest.raises(ValueError, match="model_type"):
        from zamba2.tokenizer.sentencepiece import _backend_from_sentencepiece

        _backend_from_sentencepiece(read_sentencepiece_model(unigram), unigram)
    with pytest.raises(ValueError, match="32000"):
        tok.decode([5, 32000])


# --- chat template -----------------------------------------------------------------------------------------


def test_chat_template_renders_chatml(chat_tok: Tokenizer) -> None:
    text = chat_tok.apply_chat_template(MESSAGES)
    assert text == (
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nName a Roman emperor.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith(
        "emperor.<|im_end|>\n"
    )
    ids = chat_tok.apply_chat_template(MESSAGES, tokenize=True)
    # Special tokens are matched in the text; each text segment between them is encoded on its own,
    # dummy prefix included (Mistral's tokenizer.json behaves the same way).
    expected = [1, 32000]
    for segment in ["system\nYou are terse.", 32001, "\n", 32000, "user\nName a Roman emperor.", 32001, "\n"]:
        expected += (
            [segment] if isinstance(segment, int) else chat_tok.encode(segment, add_special_tokens=False)
        )
    assert ids == [*expected, 32000, *chat_tok.encode("assistant\n", add_special_tokens=False)]
    plain = chat_tok.decode(ids, skip_special_tokens=True)
    assert plain == "system\nYou are terse. \n user\nName a Roman emperor. \n assistant\n"


def test_chat_template_agrees_with_transformers(chat_tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    chat_tok.save_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat_tok.apply_chat_template(MESSAGES) == expected


def test_chat_template_errors(
    tok: Tokenizer, chat_tok: Tokenizer, tmp_path: Path, tokenizer_json: Path
) -> None:
    with pytest.raises(ValueError, match="chat_template") as info:
        tok.apply_chat_template(MESSAGES)
    assert tok.source in str(info.value)
    with pytest.raises(ValueError, match="Unknown role: wizard"):
        chat_tok.apply_chat_template([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        chat_tok.apply_chat_template([{"content": "no role"}])
    folder = make_folder(tmp_path, {}, tokenizer_json, chat_template__jinja="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="SecurityError|chat_template failed"):
        Tokenizer.from_pretrained(folder).apply_chat_template(MESSAGES)
    folder = make_folder(
        tmp_path / "mutate", {"chat_template": "{% set x = [] %}{{ x.append(1) }}"}, tokenizer_json
    )
    with pytest.raises(ValueError, match="chat_template failed"):
        Tokenizer.from_pretrained(folder).apply_chat_template(MESSAGES)


# --- streaming ---------------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    assert len(decoder._ids) <= decoder.max_pending + 1, "window must stay small"
    return [*pieces, decoder.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_matches_full_decode(tok: Tokenizer, skip: bool) -> None:
    for text in CORPUS:
        ids = tok.encode(text) + [2] + tok.encode(" and then 🦜é𓀀", add_special_tokens=False)
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), repr(text)
        assert not any("\ufffd" in p for p in pieces), pieces


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=30), st.booleans())
def test_stream_decoder_random_text(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces if "\ufffd" not in text)


def test_stream_decoder_emits_bytes_only_when_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🦜", add_special_tokens=False)  # "▁" then four byte-fallback tokens
    assert len(ids) == 5
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", "", "", "", "🦜"]
    assert decoder.flush() == ""


def test_stream_decoder_does_not_stall_on_invalid_bytes(tok: Tokenizer) -> None:
    continuation = tok.backend.token_to_id("<0x80>")
    decoder = StreamDecoder(tok)
    out = "".join(decoder.push(continuation) for _ in range(50)) + decoder.flush()
    assert out == "\ufffd" * 50
    assert len(decoder._ids) == 0
