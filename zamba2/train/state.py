"""Training checkpoints with exact resume.

    OUT/checkpoints/step-000120/
        trainable.safetensors   the trained tensors (every parameter, or the adapters only), fp32 masters
        optimizer.pt            torch AdamW state_dict (tensors and numbers only: loaded with weights_only)
        state.json              step, data position, scheduler state, metrics so far, the run's settings
        rng.pt                  torch and Python RNG states
    OUT/checkpoints/latest      the name of the newest complete checkpoint
A multi-process run (torchrun) writes sharded/ (torch.distributed.checkpoint: trained parameters and optimizer
state, one file per rank, loadable by any number of ranks) instead of trainable.safetensors and optimizer.pt.

A checkpoint is written to a temporary folder and renamed when complete, and `latest` is replaced atomically,
so a run killed mid-save still resumes from the previous one. Only the newest `keep` checkpoints stay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Progress:
    """Where the loop is: optimizer steps done, and the data position (epoch, rows of it consumed)."""

    step: int = 0
    epoch: int = 0
    row: int = 0
    tokens: int = 0  # target tokens trained on so far
    best_eval: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    pointer = checkpoint_root(out) / "latest"
    if not pointer.is_file():
        return None
    folder = checkpoint_root(out) / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save(
    out: Path,
    trainable: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    settings: dict[str, Any],
    keep: int = 2,
    sharded: Path | None = None,
) -> Path:
    """`sharded`: a torch.distributed.checkpoint folder already written by every rank, moved in as sharded/
    in place of `trainable` and `optimizer` (which are then None)."""
    root = checkpoint_root(out)
    final = root / checkpoint_name(progress.step)
    name = final.name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if sharded is not None:
        os.replace(sharded, tmp / "sharded")
    else:
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": _python_rng()}, tmp / "rng.pt")
    state = {"progress": progress.__dict__, "scheduler": scheduler.state_dict(), "settings": settings}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / "latest")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, torch.Tensor], Progress, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG states; return the trained tensors, the progress and the settings.
    A sharded checkpoint returns no tensors and leaves the optimizer alone (distributed.load_sharded does both)."""
    sharded = (folder / "sharded").is_dir()
    needed = ("rng.pt", "state.json") if sharded else ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json")
    for name in needed:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: incomplete checkpoint, {name} is missing")
    state = json.loads((folder / "state.json").read_text())
    if not sharded:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_python_rng_from(rng["python"]))
    tensors = {} if sharded else load_file(str(folder / "trainable.safetensors"))
    return tensors, Progress(**state["progress"]), state["settings"]


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from(saved: list) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
