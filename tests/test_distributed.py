"""torch.distributed on CPU with gloo, 2 real processes started by torchrun (tiny configs, seconds each).

FSDP2 training equals one process on the same global batch; a sharded checkpoint written by 2 ranks resumes on
1 and on 2 ranks to the same weights; the consolidated folder loads anywhere with the sharded model's logits;
tensor-parallel logits equal the unsharded model's; a stuck rank ends the job within the process-group timeout.
The worker side of each case is tests/dist_workers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import dist_workers as W
from zamba2.model import Zamba2ForCausalLM
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


def test_sharded_checkpoint_resumes_on_two_ranks(fsdp_run, tmp_path):
    run_worker("fsdp", str(tmp_path), str(fsdp_run / f"step{W.SAVE_AT}"))
    diff, key = max_diff(weights(tmp_path / "final"), weights(fsdp_run / "final"))
    print(f"resumed on 2 ranks vs uninterrupted: max |diff| {diff:.2e} at {key}")
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
        assert r["q_proj_local_rows"] * 2 == r["q_proj_rows"], name  # really sharded
    assert results["one_shared_block"]["mamba_sharded"] and results["two_shared_blocks"]["mamba_sharded"]
    assert results["gqa_two_groups"]["mamba_sharded"]
    assert not results["mamba_replicated"]["mamba_sharded"]
    assert not results["vocab_replicated_untied"]["vocab_sharded"]


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
