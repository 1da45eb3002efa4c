"""TrainConfig (one run's settings, named as the `zamba2 train` flags) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TASKS = ("causal-lm", "sequence-classification")
# fp32: everything fp32.  bf16: bf16 parameters, fp32 masters in the optimizer step (precision.py; under torchrun
# FSDP's bf16 parameter gathers over fp32 shards).  bf16-autocast: fp32 parameters, bf16 autocast in the forward.
DTYPES = ("fp32", "bf16", "bf16-autocast")


@dataclass
class TrainConfig:
    """One training run; field names are the `zamba2 train` flags."""

    out: str
    data: str
    model: str | None = None  # a folder or hub id to fine-tune; or
    config: str | None = None  # "tiny" / a preset / a config.json: train from a fresh initialisation
    tokenizer: str | None = None  # with --config: the tokenizer folder
    eval_data: str | None = None
    task: str = "causal-lm"
    num_labels: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    lora_dropout: float = 0.0
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int | None = None
    epochs: float | None = None
    eval_every: int = 0
    eval_batches: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    grad_checkpointing: bool = False
    dtype: str = "fp32"  # one of DTYPES
    optimizer_in_backward: bool = False  # step each parameter as soon as its gradient is complete (precision.py)
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    plot: bool = False
    progress: bool = True
    dist_timeout: float = 600.0  # seconds a collective may wait under torchrun before the job gives up
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingStopped(RuntimeError):
    """The run stopped with a message (NaN loss, interrupted); the newest good checkpoint is kept."""


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
