"""torch.distributed on CPU with gloo, 2 real processes started by torchrun (tiny configs, seconds each).

FSDP2 training equals one process on the same global batch; a sharded checkpoint written by 2 ranks resumes on
1 and on 2 ranks to the same weights; the consolidated folder loads anywhere with the sharded model's logits;
tensor-parallel logits equal the unsharded model's; a stuck rank ends the job within the process-group timeout.
The worker side of the library-level cases is tests/dist_workers.py; the `zamba2 train` cases run the real
command under torchrun against the same run in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import dist_workers as W
from zamba2.model import Zamba2ForCausalLM
from zamba2.train import TrainConfig, state, train
from zamba2.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
# A 2-rank job on a busy 2-core machine: process start, imports and gloo set-up take most of it.
LAUNCH_TIMEOUT_S = 300


def torchrun(*args: str, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port of its own) with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = torchrun("-m", "tests.dist_workers", *args, nproc=nproc)
    assert proc.returncode == 0, f"workers failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    return (a[worst].float() - b[worst].float()).abs().max().item(), worst


def reference(steps: range, model=None, optimizer=None):
    """One process, the whole global batch each step."""
    model = model or W.fresh_model()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=W.LR)
    W.train_steps(model, optimizer, steps)
    return model


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return Zamba2ForCausalLM.from_pretrained(folder, progress=False).state_dict()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_worker("fsdp", str(out))
    return out


def test_fsdp_steps_equal_one_process(fsdp_run):
    ref = reference(range(W.STEPS)).state_dict()
    diff, key = max_diff(weights(fsdp_run / "final"), ref)
    print(f"FSDP2 (2 ranks) vs one process after {W.STEPS} steps: max |diff| {diff:.2e} at {key}")
    assert diff <= 1e-5, f"{key}: {diff}"


def test_consolidated_checkpoint_loads_with_the_same_logits(fsdp_run):
    model = Zamba2ForCausalLM.from_pretrained(fsdp_run / "final", progress=False)
    with torch.no_grad():
        logits = model(W.probe()).logits
    sharded = load_file(str(fsdp_run / "logits.safetensors"))["logits"]
    diff = (logits - sharded).abs().max().item()
    print(f"consolidated (1 process) vs sharded logits: max |diff| {diff:.2e}")
    assert diff <= 1e-6


def test_sharded_checkpoint_resumes_on_one_process(fsdp_run):
    model = W.fresh_model(seed=123)  # other weights: everything must come from the checkpoint
    optimizer = torch.optim.AdamW(model.parameters(), lr=W.LR)
    D.load_sharded(fsdp_run / f"step{W.SAVE_AT}", model, optimizer)
    reference(range(W.SAVE_AT, W.STEPS), model, optimizer)
    diff, key = max_diff(model.state_dict(), weights(fsdp_run / "final"))
    print(f"resumed on 1 process vs uninterrupted 2 ranks: max |diff| {diff:.2e} at {key}")
    assert diff <= 1e-5, f"{key}: {diff}"


def test_fsdp_mixed_precision_keeps_fp32_master_weights(fsdp_run):
    mixed = json.loads((fsdp_run / "mixed.json").read_text())
    assert mixed["param_dtypes"] == ["torch.float32"]
    assert torch.isfinite(torch.tensor(mixed["loss"]))


def test_load_sharded_names_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        D.load_sharded(tmp_path, W.fresh_model())


def test_tensor_parallel_logits_equal_one_process(tmp_path):
    run_worker("tp", str(tmp_path))
    results = json.loads((tmp_path / "tp.json").read_text())
    refused = results.pop("refused")
    assert refused == "tensor parallel size 2 must divide num_key_value_heads (1)", refused
    for name, r in results.items():
        print(name, r)
    for name, r in results.items():
        assert r["forward"] <= 1e-5 and r["step"] <= 1e-5, f"{name}: {r}"
        assert r["tokens_equal"], name
        assert r["q_proj_local_rows"] == r["q_proj_rows"], name  # really sharded: local rows x ranks
    assert results["one_shared_block"]["mamba_sharded"] and results["two_shared_blocks"]["mamba_sharded"]
    assert results["gqa_two_groups"]["mamba_sharded"]
    assert not results["mamba_replicated"]["mamba_sharded"]
    assert not results["vocab_replicated_untied"]["vocab_sharded"]


@pytest.mark.slow
def test_tensor_parallel_four_ranks_norm_groups_across_and_within_ranks(tmp_path):
    run_worker("tp", str(tmp_path), nproc=4)
    results = json.loads((tmp_path / "tp.json").read_text())
    assert results.pop("refused") == "tensor parallel size 4 must divide num_key_value_heads (1)"
    for name, r in results.items():
        print(name, r)
        assert r["forward"] <= 1e-5 and r["step"] <= 1e-5 and r["tokens_equal"] and r["mamba_sharded"], name


def test_a_stuck_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout = 8
    start = time.monotonic()
    proc = torchrun("-m", "tests.dist_workers", "hang", str(tmp_path), str(timeout))
    elapsed = time.monotonic() - start
    print(f"exit {proc.returncode} after {elapsed:.1f} s; stderr tail:\n{proc.stderr[-1500:]}")
    assert proc.returncode != 0
    assert "rank 0: a collective failed" in proc.stderr and "timed out" in proc.stderr.lower()
    assert elapsed < LAUNCH_TIMEOUT_S


def test_generate_tp_two_ranks_prints_what_one_process_prints(tmp_path):
    from helpers_cli import make_model_folder

    folder = make_model_folder(tmp_path / "model")
    args = ["--model", str(folder), "--max-new-tokens", "6", "--quiet", "Hello there"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "zamba2", "generate", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "zamba2", "generate", "--tp", "2", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip(), (one.stdout, two.stdout)


def test_generate_tp_without_torchrun_says_how_to_launch(capsys, monkeypatch):
    from zamba2.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["generate", "--tp", "2", "--model", str(ROOT / "nonexistent"), "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "needs 2 processes but WORLD_SIZE is 1" in err and "torchrun --nproc-per-node 2" in err, err


# ---- `zamba2 train` under torchrun ---------------------------------------------------------------

LINES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Or to take arms against a sea of troubles, and by opposing end them.",
]
TRAIN = dict(config="tiny", seq_len=32, batch_size=4, steps=5, save_every=3, lr=3e-3, warmup=2, seed=1)


def train_args(out: Path, data: Path, tok: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    return ["-m", "zamba2", "train", *flags, f"--data={data}", f"--tokenizer={tok}", f"--out={out}", "--quiet", *extra]


def train_here(out: Path, data: Path, tok: Path, resume: bool = False) -> None:
    train(TrainConfig(out=str(out), data=str(data), tokenizer=str(tok), resume=resume, progress=False, **TRAIN))


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose newest checkpoint is `step` (the later ones and the result removed)."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for later in (dst / "checkpoints").glob("step-*"):
        if later.name > state.checkpoint_name(step):
            shutil.rmtree(later)
    (dst / "checkpoints" / "latest").write_text(state.checkpoint_name(step) + "\n")
    shutil.copytree(src / "data-cache", dst / "data-cache")
    (dst / "metrics.jsonl").write_text("")
    return dst


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory) -> dict[str, Path]:
    """The same 5-step run in one process and under torchrun with 2 ranks (checkpoints at steps 3 and 5)."""
    root = tmp_path_factory.mktemp("train")
    tok, data = root / "tok", root / "corpus"
    tok.mkdir()
    shutil.copyfile(ROOT / "tests" / "fixtures" / "mistral-v0.1-tokenizer.model", tok / "tokenizer.model")
    data.mkdir()
    for i in range(6):
        (data / f"doc{i}.txt").write_text("\n".join(LINES[(i + k) % 3] for k in range(12)) + "\n")
    train_here(root / "one", data, tok)
    proc = torchrun(*train_args(root / "two", data, tok))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"one": root / "one", "two": root / "two", "tok": tok, "data": data, "root": root}


def test_train_two_ranks_equals_one_process(train_runs):
    one, two = train_runs["one"], train_runs["two"]
    diff, key = max_diff(load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors")))
    print(f"zamba2 train, 2 ranks vs 1 process, {TRAIN['steps']} steps: max |diff| {diff:.2e} at {key}")
    print("losses", losses(one), losses(two))
    assert diff <= 1e-5, f"{key}: {diff}"
    assert all(abs(losses(one)[s] - losses(two)[s]) <= 1e-4 for s in losses(one))
    assert (two / "checkpoints" / "step-000003" / "sharded" / ".metadata").is_file()


def test_train_sharded_checkpoint_resumes_on_one_and_on_two_ranks(train_runs, tmp_path):
    two = train_runs["two"]
    on_one = rewind(two, tmp_path / "on_one", 3)
    train_here(on_one, train_runs["data"], train_runs["tok"], resume=True)
    on_two = rewind(two, tmp_path / "on_two", 3)
    proc = torchrun(*train_args(on_two, train_runs["data"], train_runs["tok"], "--resume"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = load_file(str(two / "model.safetensors"))
    for run in (on_one, on_two):
        diff, key = max_diff(load_file(str(run / "model.safetensors")), final)
        print(f"{run.name}: resumed at step 3 vs uninterrupted: max |diff| {diff:.2e} at {key}; {losses(run)}")
        assert diff <= 1e-5, f"{run.name} {key}: {diff}"
        assert sorted(losses(run)) == [4, 5]
        assert all(abs(losses(run)[s] - losses(two)[s]) <= 1e-4 for s in (4, 5)), (losses(run), losses(two))


def test_train_consolidated_result_loads_in_one_process_and_in_transformers(train_runs):
    import transformers

    one, two = train_runs["one"], train_runs["two"]
    ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = Zamba2ForCausalLM.from_pretrained(two, progress=False).eval()(ids).logits
        alone = Zamba2ForCausalLM.from_pretrained(one, progress=False).eval()(ids).logits
        theirs = transformers.Zamba2ForCausalLM.from_pretrained(two).eval()(ids).logits
    print(f"2-rank result vs 1-process result {(ours - alone).abs().max():.2e}, vs transformers "
          f"{(ours - theirs).abs().max():.2e}")  # fmt: skip
    assert (ours - alone).abs().max() <= 1e-4
    assert (ours - theirs).abs().max() <= 1e-4


def test_train_refuses_a_batch_the_ranks_cannot_share(train_runs, tmp_path):
    proc = torchrun(*train_args(tmp_path / "odd", train_runs["data"], train_runs["tok"], "--batch-size=3"))
    assert proc.returncode != 0
    assert "--batch-size 3 (the global batch) must be divisible by WORLD_SIZE 2" in proc.stderr, proc.stderr[-2000:]


def test_train_lora_under_fsdp_equals_one_process(train_runs):
    from torch.distributed.checkpoint import FileSystemReader

    root, lora = train_runs["root"], ["--lora-rank=4", "--steps=3", "--save-every=0"]
    proc = torchrun(*train_args(root / "lora2", train_runs["data"], train_runs["tok"], *lora))
    assert proc.returncode == 0, proc.stderr[-4000:]
    train(TrainConfig(out=str(root / "lora1"), data=str(train_runs["data"]), tokenizer=str(train_runs["tok"]),
                      progress=False, lora_rank=4, **{**TRAIN, "steps": 3, "save_every": 0}))  # fmt: skip
    two = load_file(str(root / "lora2" / "adapter_model.safetensors"))
    diff, key = max_diff(two, load_file(str(root / "lora1" / "adapter_model.safetensors")))
    print(f"LoRA adapters, 2 ranks vs 1 process after 3 steps: max |diff| {diff:.2e} at {key} ({len(two)} tensors)")
    assert diff <= 1e-5, f"{key}: {diff}"
    saved = FileSystemReader(str(root / "lora2" / "checkpoints" / "step-000003" / "sharded")).read_metadata()
    weights = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), [k for k in weights if "lora_" not in k][:3]


def test_one_process_needs_no_process_group_and_backends_are_named(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed() is None
    assert D.pick_backend("cpu") == "gloo"
    with pytest.raises(D.DistributedError, match="no torch.distributed backend for device type 'mps'"):
        D.pick_backend("mps")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(D.DistributedError, match="WORLD_SIZE='two' is not an integer"):
        D.init_distributed()
