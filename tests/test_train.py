"""zamba2.train: gradients against transformers, exact resume, learning, classification, the CLI's bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import make_pair, maxdiff, small_kwargs
from safetensors.torch import load_file

from zamba2.train import DataError, TrainConfig, Trainer, TrainingStopped
from zamba2.train.data import IGNORE, causal_lm_rows, read_samples

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "To die, to sleep, no more; and by a sleep to say we end the heart-ache.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    shutil.copyfile(FIXTURES / "mistral-v0.1-tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text("\n".join(LINES[(i + k) % 4] for k in range(12)) + "\n")
    return folder


def tiny_run(out: Path, data: Path, tok: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), data=str(data), config="tiny", tokenizer=str(tok), seq_len=32, batch_size=2,
                lr=3e-3, warmup=2, steps=6, seed=1, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---- the math --------------------------------------------------------------------------------------


def test_gradients_equal_transformers_on_a_padded_batch():
    """Every parameter's gradient, fp32, a left-padded batch with masked labels."""
    ref, ours, config = make_pair("lm", **small_kwargs(use_mem_rope=True, num_mem_blocks=2))
    ref.train()
    ours.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    ref(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    ours(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for key, p in ours.named_parameters():
        r = ref_params[key].grad
        assert p.grad is not None, key
        torch.testing.assert_close(p.grad, r, rtol=2e-4, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
        worst = max(worst, maxdiff(p.grad, r))
    print(f"max grad diff {worst:.2e}")


def test_rows_restart_positions_and_mask_document_starts(tokenizer_dir, corpus):
    from zamba2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    rows = causal_lm_rows(corpus, tok, 40)
    batch = rows.batch(range(len(rows)))
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert (pos[:, 0] == 0).all()
    starts = (pos == 0) & (torch.arange(40) > 0)
    assert starts.any(), "some row should hold a document start"
    assert (ids[starts] == tok.bos_token_id).all()
    assert (labels[starts] == IGNORE).all()
    # positions count up by one inside a document
    steps = pos[:, 1:] - pos[:, :-1]
    assert ((steps == 1) | (pos[:, 1:] == 0)).all()


# ---- the loop --------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(tmp_path, tokenizer_dir, corpus):
    whole = Trainer(tiny_run(tmp_path / "a", corpus, tokenizer_dir, grad_accum=2))
    whole.run()
    first = Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, grad_accum=2, steps=6, save_every=3))
    while first.progress.step < 3:
        first.train_step()
    first.save_checkpoint()
    resumed = Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, grad_accum=2, resume=True))
    assert resumed.progress.step == 3
    resumed.run()
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    worst = max(maxdiff(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {worst:.3e}"


def test_short_run_lowers_held_out_loss(tmp_path, tokenizer_dir, corpus):
    trainer = Trainer(tiny_run(tmp_path, corpus, tokenizer_dir, eval_data=str(corpus), steps=25, lr=5e-3))
    before = trainer.evaluate()["eval_loss"]
    after = trainer.run()["eval_loss"]
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval_ppl"] == pytest.approx(math.exp(after))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_full_fine_tune_checkpoint_loads_in_transformers(tmp_path, tokenizer_dir, corpus):
    import transformers

    Trainer(tiny_run(tmp_path, corpus, tokenizer_dir, steps=2)).run()
    from zamba2 import Zamba2ForCausalLM

    ours = Zamba2ForCausalLM.from_pretrained(tmp_path, progress=False).eval()
    ref = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 32000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = maxdiff(ours(ids).logits, ref(ids).logits)
    print(f"max logit diff {d:.2e}")
    assert d < 1e-4


def test_sequence_classification_learns_a_separable_set(tmp_path, tokenizer_dir):
    rows = [{"text": f"{'good happy fine' if i % 2 else 'bad sad awful'} {i}", "label": i % 2} for i in range(40)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run(tmp_path / "out", data, tokenizer_dir, task="sequence-classification", num_labels=2,
                   eval_data=str(data), steps=30, batch_size=8, lr=3e-3)  # fmt: skip
    result = Trainer(cfg).run()
    print(f"accuracy {result['eval_accuracy']:.3f}")
    assert result["eval_accuracy"] >= 0.95


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_dir, corpus):
    trainer = Trainer(tiny_run(tmp_path, corpus, tokenizer_dir, steps=40, lr=1e4, max_grad_norm=0, save_every=1))
    with pytest.raises(TrainingStopped, match="the loss became"):
        trainer.run()
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    saved = load_file(str(tmp_path / "checkpoints" / latest / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


# ---- data errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, task, match",
    [
        ("empty.txt", "", "causal-lm", "no samples"),
        ("nofield.jsonl", '{"text": "a"}\n{"txt": "b"}\n', "causal-lm", r"nofield.jsonl:2: expected a 'text'"),
        ("bad.jsonl", '{"text": "a"}\nnot json\n', "causal-lm", r"bad.jsonl:2: not valid JSON"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "causal-lm",
         r"chat.jsonl:1: .*no assistant"),
        ("label.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n', "sequence-classification",
         r"label.jsonl:2: label 5 is outside \[0, 2\)"),
        ("nolabel.csv", "text,other\na,1\n", "sequence-classification", r"nolabel.csv:1: the header must name"),
    ],
)  # fmt: skip
def test_bad_data_names_file_and_line(tmp_path, name, content, task, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        samples = read_samples(path, task)
        if task == "sequence-classification":
            from zamba2.train.data import _label_id

            for s in samples:
                _label_id(s.label, 2, None, s.where)


def _cli(*args: str, cwd: Path | None = None, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "zamba2", "train", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)  # fmt: skip


def test_cli_bad_input_is_one_line(tmp_path, tokenizer_dir, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    common = ["--config", "tiny", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"), "-q"]
    cases = [
        (["--data", str(empty)], "no samples"),
        (["--data", str(corpus), "--seq-len", "1"], "--seq-len"),
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--data", str(corpus), "--task", "sequence-classification"], "--num-labels"),
        (["--data", str(corpus), "--lora-rank", "4", "--lora-dropout", "1"], "[0, 1)"),
        (["--data", str(corpus), "--optimizer-in-backward"], "--max-grad-norm 0"),
    ]
    for extra, needle in cases:
        r = _cli(*common, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], (extra, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_interrupt_writes_a_resumable_checkpoint(tmp_path, tokenizer_dir, corpus):
    out = tmp_path / "run"
    args = ["--config", "tiny", "--tokenizer", str(tokenizer_dir), "--data", str(corpus), "--out", str(out),
            "--seq-len", "32", "--batch-size", "2", "--steps", "100000", "-q"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Ctrl-C as a terminal sends it: a suite started in the background (nohup, `&`) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler, so the child gets SIGINT's default disposition back.
    proc = subprocess.Popen([sys.executable, "-m", "zamba2", "train", *args], stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"step": 3' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resumable checkpoint" in err and "Traceback" not in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    assert state["progress"]["step"] >= 3
    resumed = Trainer(TrainConfig(out=str(out), data=str(corpus), config="tiny", tokenizer=str(tokenizer_dir),
                                  seq_len=32, batch_size=2, steps=100000, resume=True, progress=False))  # fmt: skip
    assert resumed.progress.step == state["progress"]["step"]


def test_lora_run_trains_only_adapters_and_resumes_exactly(tmp_path, tokenizer_dir, corpus):
    from zamba2 import Zamba2ForCausalLM

    Trainer(tiny_run(tmp_path / "base", corpus, tokenizer_dir, steps=1)).run()
    base = str(tmp_path / "base")
    lora = dict(model=base, config=None, tokenizer=None, lora_rank=4, lr=1e-2)
    whole = Trainer(tiny_run(tmp_path / "a", corpus, tokenizer_dir, **lora))
    whole.run()
    first = Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, **lora))
    while first.progress.step < 3:
        first.train_step()
    first.save_checkpoint()
    Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, resume=True, **lora)).run()
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a and all(".lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max(maxdiff(a[k], b[k]) for k in a):.3e}"
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # B moved off zero
    # the base weights did not change
    before = Zamba2ForCausalLM.from_pretrained(base, progress=False).state_dict()
    after = {k: v for k, v in whole.model.state_dict().items() if ".lora_" not in k and ".base_layer" not in k}
    for k, v in after.items():
        if k in before:
            assert torch.equal(before[k], v), k
