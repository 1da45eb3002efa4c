"""The model shipped in the package (zamba2.DEFAULT_MODEL): its files, its figures, and the CLI default.

The perplexity check is the tripwire for loaders and kernels: a broken key map, dtype conversion or scan shows
up as a perplexity far from the one recorded when the model was exported (evaluation.json, also in the card).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zamba2
from zamba2 import Zamba2ForCausalLM
from zamba2.eval import score_tokens
from zamba2.tokenizer import Tokenizer

EXCERPT = Path(__file__).parent / "fixtures" / "macbeth-excerpt.txt"  # held out: never trained on
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures() -> dict:
    return json.loads((zamba2.DEFAULT_MODEL / "evaluation.json").read_text())


def excerpt_perplexity(model, tok) -> float:
    ids = tok.encode(EXCERPT.read_text(encoding="utf-8"))
    return math.exp(-float(score_tokens(model, ids).logprobs.double().mean()))


@pytest.mark.skipif(not (zamba2.DEFAULT_MODEL / "evaluation.json").is_file(), reason="no evaluation.json yet")
def test_shipped_files():
    folder = zamba2.DEFAULT_MODEL
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "evaluation.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size < 64 * 2**20
    card = (folder / "README.md").read_text()
    for needle in ("macbeth_gut.txt", "tempest_gut.txt", "make default-model", "does not answer questions"):
        assert needle in card, needle


@pytest.mark.skipif(not (zamba2.DEFAULT_MODEL / "evaluation.json").is_file(), reason="no evaluation.json yet")
def test_perplexity_on_a_held_out_excerpt_matches_the_card(figures):
    model = Zamba2ForCausalLM.from_pretrained(zamba2.DEFAULT_MODEL, progress=False).eval()
    assert model.dtype == torch.bfloat16
    ppl = excerpt_perplexity(model, Tokenizer.from_pretrained(zamba2.DEFAULT_MODEL))
    recorded = figures["excerpt"]["perplexity"]
    print(f"excerpt perplexity {ppl:.3f}, recorded {recorded:.3f}")
    assert abs(ppl / recorded - 1) < 0.01
    assert figures["heldout"]["bf16"]["macbeth_gut.txt"] <= 110
    assert figures["heldout"]["bf16"]["tempest_gut.txt"] <= 110


def test_cli_uses_the_default_model_without_model_flag():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "zamba2", "generate", "--max-new-tokens", "8", "--seed", "0",
                        "To be, or not to be"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "using the default model" in r.stderr
    assert r.stdout.strip()


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return zamba2.DEFAULT_MODEL


def test_eval_through_the_server_equals_eval_without_it(checkpoint):
    """`zamba2 eval` on the shipped model (bf16) prints the same perplexity with and without --server."""
    test_serve = pytest.importorskip("test_serve")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # windows of 256 tokens moving by 128: several windows, so the server scores a batch of prompts at once
    base = [sys.executable, "-m", "zamba2", "eval", "--text", str(EXCERPT), "--context-length", "256", "-q"]
    figures = []
    with contextlib.contextmanager(test_serve.server.__wrapped__)(checkpoint) as url:
        for extra in ([], ["--server", url, "--api-key", test_serve.KEY]):
            r = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, r.stderr
            figures.append(r.stdout.strip())
    assert figures[0].startswith("perplexity") and figures[0] == figures[1], figures


DRAFT = zamba2.DEFAULT_MODEL.parent / "shakespeare-draft"


@pytest.mark.skipif(not (DRAFT / "model.safetensors").is_file(), reason="no draft model shipped")
def test_shipped_draft_model_drafts_for_the_default_model():
    """The draft shares the default model's tokenizer; in fp32 speculation with it gives plain greedy's tokens."""
    assert (DRAFT / "tokenizer.json").read_bytes() == (zamba2.DEFAULT_MODEL / "tokenizer.json").read_bytes()
    assert "make draft-model" in (DRAFT / "README.md").read_text()
    model = Zamba2ForCausalLM.from_pretrained(zamba2.DEFAULT_MODEL, dtype="float32", progress=False).eval()
    draft = Zamba2ForCausalLM.from_pretrained(DRAFT, dtype="float32", progress=False).eval()
    assert draft.config.vocab_size == model.config.vocab_size
    assert draft.config.num_hidden_layers < model.config.num_hidden_layers
    ids = torch.tensor([Tokenizer.from_pretrained(DRAFT).encode("KING HENRY.\nNow, lords, ")])
    plain = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=draft), plain)


def test_demo_runs_and_speculation_gives_the_same_text():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "zamba2.demo"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "speculative: " in r.stderr and "Traceback" not in r.stderr
    # the last two texts are the plain and the speculative greedy runs of the same prompt
    texts = r.stdout.split("Running: zamba2 generate --greedy")[1:]
    assert len(texts) == 2
    plain, spec = (t.split("\n", 1)[1].split("\n\nThe model writes")[0].strip() for t in texts)
    assert plain and plain == spec
