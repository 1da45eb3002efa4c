"""EleutherAI's lm-evaluation-harness (the real `lm_eval`, `--model local-completions`) against the real
server: a local multiple-choice task and a local perplexity task (JSONL files, --include_path), no download
(the tokenizer is the server's: tokenizer_backend=remote, HF_*_OFFLINE), and its per-item loglikelihoods
equal `zamba2 eval`'s. Slow: lm_eval takes a minute or two to import and start on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")
pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import KEY, NAME, ROOT  # noqa: E402

# The real server of test_serve (tiny random checkpoint), started only when these tests run.
checkpoint, server = test_serve.checkpoint, test_serve.server

ITEMS = [
    {"context": "The capital of France is", "choices": [" Paris", " London", " Rome"], "answer": 0},
    {"context": "Two plus two is ", "choices": ["four", "five"], "answer": 1},
    {"context": "Water is", "choices": [" wet", " dry", " loud", " purple"], "answer": 0},
    {"context": "", "choices": ["Yes", "No"], "answer": 1},
]
DOCS = [
    "Once upon a time, a small fox lived at the edge of a quiet wood.",
    "The rain fell all night; by morning the river had risen over its banks, and the old bridge was gone.",
]
MC_TASK = """\
task: zamba2_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""
PPL_TASK = """\
task: zamba2_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_loglikelihoods_equal_zamba2_eval(server, checkpoint, tmp_path):
    from zamba2.cli import main

    items, docs, tasks, out = tmp_path / "items.jsonl", tmp_path / "docs.jsonl", tmp_path / "tasks", tmp_path / "out"
    items.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    tasks.mkdir()
    (tasks / "zamba2_mc.yaml").write_text(MC_TASK.format(items=items))
    (tasks / "zamba2_ppl.yaml").write_text(PPL_TASK.format(docs=docs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OPENAI_API_KEY": KEY}  # fmt: skip
    model_args = f"model={NAME},base_url={server}/v1/completions,tokenizer_backend=remote,auth_token={KEY}," \
        "max_retries=1"  # fmt: skip
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
            "--batch_size", "4", "--tasks", "zamba2_mc,zamba2_ppl", "--include_path", str(tasks), "--log_samples",
            "--output_path", str(out)]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # the same items and documents through `zamba2 eval` (lm_eval scores choices without bos, texts with it)
    mc_report, ppl_report = tmp_path / "mc.json", tmp_path / "ppl.json"
    base = ["eval", "--model", str(checkpoint), "--quiet"]
    assert main([*base, "--choices", str(items), "--no-bos", "--output", str(mc_report)]) == 0
    assert main([*base, "--text", str(docs), "--output", str(ppl_report)]) == 0
    ours = json.loads(mc_report.read_text())["choices"][0]["items"]
    theirs = sorted(samples(out, "zamba2_mc"), key=lambda s: s["doc_id"])
    assert len(theirs) == len(ours) == len(ITEMS)
    worst = 0.0
    for mine, sample in zip(ours, theirs, strict=True):
        lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        worst = max([worst] + [abs(a - b) for a, b in zip(lls, mine["loglikelihoods"], strict=True)])
        assert sample["acc"] == float(mine["correct"])
    assert worst < 1e-4, f"multiple choice: max |lm_eval - zamba2 eval| = {worst:.3g}"
    ours = json.loads(ppl_report.read_text())["texts"][0]["documents"]
    theirs = sorted(samples(out, "zamba2_ppl"), key=lambda s: s["doc_id"])
    diffs = [abs(float(s["filtered_resps"][0]) - d["logprob"]) for s, d in zip(theirs, ours, strict=True)]
    assert len(diffs) == len(DOCS) and max(diffs) < 1e-4, f"perplexity: |lm_eval - zamba2 eval| = {diffs}"
