"""zamba2.eval perplexity and multiple-choice scoring, and `zamba2 eval`: windows score each token once,
figures equal direct log-softmax sums, bad input is refused naming the file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_cli import make_model_folder

from zamba2.cli import main
from zamba2.eval import choices as mc
from zamba2.eval import perplexity as ppl
from zamba2.eval.scorers import LocalScorer
from zamba2.model import Zamba2ForCausalLM
from zamba2.tokenizer import Tokenizer

ITEMS = [
    {"context": "The capital of France is", "choices": [" Paris", " London", " Rome"], "answer": 0},
    {"context": "Two plus two is ", "choices": ["four", "five"], "answer": 1},
    {"context": "", "choices": ["Yes", "No"], "answer": 1},
]
TEXT = "Once upon a time, a small fox lived at the edge of a quiet wood. " * 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("eval") / "model")


@pytest.fixture(scope="module")
def loaded(folder: Path):
    return Zamba2ForCausalLM.from_pretrained(folder), Tokenizer.from_pretrained(folder)


def direct(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize("n,context,stride", [(10, 6, 3), (10, 20, 5), (100, 16, 15), (33, 8, 1), (9, 8, 7)])
def test_windows_score_every_token_once(n, context, stride):
    spans = ppl.windows(n, context, stride)
    scored = [t for _, e, first in spans for t in range(first, e)]
    assert scored == list(range(1, n)), spans
    assert all(e - b <= context and b < first for b, e, first in spans)
    assert all(first - b >= context - stride for b, _, first in spans[1:])  # enough context for every window
    if n == 10 and context == 6:
        assert spans == [(0, 6, 1), (3, 9, 6), (4, 10, 9)]
    with pytest.raises(ValueError, match="stride"):
        ppl.windows(n, context, context)


def test_perplexity_equals_direct_sums(loaded):
    model, tok = loaded
    ids = tok.encode(TEXT)
    scorer = LocalScorer(model)
    whole = ppl.score_ids(scorer, ids, context_length=len(ids), stride=1)
    assert abs(whole - math.fsum(direct(model, ids))) < 1e-3
    # strided: each window's new tokens, scored from its own start
    want = 0.0
    for b, e, first in ppl.windows(len(ids), 64, 24):
        want += math.fsum(direct(model, ids[b:e])[first - b - 1 :])
    got = ppl.score_ids(scorer, ids, 64, 24, batch=3)
    assert abs(got - want) < 1e-3, (got, want)
    (score,) = ppl.perplexity(scorer, tok, [ppl.Document("t", TEXT)], 64, 24)
    assert score.tokens == len(ids) - 1 and score.bytes == len(TEXT.encode())
    assert score.perplexity == pytest.approx(math.exp(-got / (len(ids) - 1)), rel=1e-9)
    assert score.bits_per_byte == pytest.approx(-got / math.log(2) / len(TEXT.encode()), rel=1e-9)


def test_choices_equal_direct_sums(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    items = mc.read_items(path)
    for add_bos in (True, False):
        scores = mc.score_items(LocalScorer(model), tok, items, context_length=256, add_bos=add_bos, batch=2)
        for item, score in zip(items, scores, strict=True):
            for choice, ll in zip(item.choices, score.loglikelihoods, strict=True):
                ctx, cont = mc.encode_pair(tok, item.context, choice, add_bos)
                want = math.fsum(direct(model, ctx + cont)[len(ctx) - 1 :])
                assert abs(ll - want) < 1e-4, (item.where, choice, ll, want)
    # lm_eval's split: the context's trailing space moves to the choice; an empty context is bos alone
    ctx, cont = mc.encode_pair(tok, "Two plus two is ", "four", add_bos=False)
    assert ctx == tok.encode("Two plus two is", add_special_tokens=False)
    assert ctx + cont == tok.encode("Two plus two is four", add_special_tokens=False)
    assert mc.encode_pair(tok, "", "Yes", True) == ([tok.bos_token_id], tok.encode("Yes", add_special_tokens=False))


BAD_ITEMS = [
    ("not json", "not valid JSON"),
    ('{"context": 3, "choices": ["a", "b"], "answer": 0}', '"context" must be a string'),
    ('{"context": "x", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', '"answer" must be the index'),
    ('{"context": "x", "choices": ["a", "b"], "answer": true}', '"answer" must be the index'),
]


@pytest.mark.parametrize("line,message", BAD_ITEMS)
def test_bad_items_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        mc.read_items(path)
    assert f"{path}:3:" in str(err.value)


def test_cli_eval_report_equals_the_library(folder, loaded, tmp_path, capsys):
    model, tok = loaded
    text, items, out = tmp_path / "held.txt", tmp_path / "items.jsonl", tmp_path / "report.json"
    text.write_text(TEXT)
    items.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    argv = ["eval", "--model", str(folder), "--text", str(text), "--choices", str(items), "--context-length", "64",
            "--stride", "24", "--output", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    got = report["texts"][0]
    want = ppl.score_ids(LocalScorer(model), tok.encode(TEXT), 64, 24)
    assert abs(got["logprob"] - want) < 1e-4 and got["tokens"] == len(tok.encode(TEXT)) - 1
    assert printed[0] == (f"perplexity {text} (1 document, {got['tokens']} tokens, {got['bytes']} bytes): "
                          f"{got['perplexity']:.4f} per token, {got['bits_per_byte']:.4f} bits per byte")  # fmt: skip
    lib = mc.score_items(LocalScorer(model), tok, mc.read_items(items), 64)
    rows = report["choices"][0]["items"]
    for row, score in zip(rows, lib, strict=True):
        assert max(abs(a - b) for a, b in zip(row["loglikelihoods"], score.loglikelihoods, strict=True)) < 1e-4
    assert report["choices"][0]["accuracy"] == sum(r["correct"] for r in rows) / 3
    assert printed[1].startswith(f"choices {items} (3 items): accuracy ")


def test_cli_eval_errors_are_one_line(folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"], "answer": 5}\n')
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cases = [
        (["eval", "--model", str(folder)], "nothing to evaluate"),
        (["eval", "--model", str(folder), "--choices", str(bad)], f"{bad}:1:"),
        (["eval", "--model", str(folder), "--text", str(tmp_path / "missing.txt")], "no such file"),
        (["eval", "--model", str(folder), "--text", str(text), "--context-length", "8", "--stride", "8"], "--stride"),
        (["eval", "--model", str(folder), "--text", str(text), "--context-length", "5000"], "max_position_embeddings"),
        (["eval", "--model", str(folder), "--text", str(text), "--server", "http://127.0.0.1:9"], "127.0.0.1:9"),
    ]
    for argv, message in cases:
        assert main(argv) in (1, 2), argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
