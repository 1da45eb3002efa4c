"""The training loop: AdamW, linear warm-up then cosine decay, gradient accumulation, clipping, bf16 weights
with fp32 masters in the optimizer (precision.py) or bf16 autocast over fp32 weights, periodic held-out loss,
checkpoints with exact resume, JSONL metrics. Under torchrun
(WORLD_SIZE > 1) the model is sharded with FSDP2 and each rank takes its share of every batch (distributed.py).

    step s:  for each of grad_accum micro-batches: loss = model(**batch).loss * (targets_b / targets_step);
             backward.  clip(max_grad_norm); AdamW step; scheduler step.
    every eval_every steps: held-out loss and perplexity;  every save_every steps: a checkpoint.

The loss of a step is the mean over every target token of the step (all micro-batches together), so the result
does not depend on how the step is split into micro-batches. The data order is a seeded permutation per epoch;
the position in it is part of the checkpoint, so a resumed run sees exactly the rows an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from zamba2.train import distributed, precision
from zamba2.train import state as ckpt
from zamba2.train.config import DTYPES, TASKS, TrainConfig, TrainingStopped, lr_factor
from zamba2.train.data import IGNORE, DataError, Labelled, Rows, causal_lm_rows

# ---- building the pieces -------------------------------------------------------------------------


def _load_model_and_tokenizer(cfg: TrainConfig):
    from zamba2 import Zamba2Config, Zamba2ForCausalLM, Zamba2ForSequenceClassification
    from zamba2.checkpoint import resolve_model_dir
    from zamba2.tokenizer import Tokenizer

    cls = Zamba2ForSequenceClassification if cfg.task == "sequence-classification" else Zamba2ForCausalLM
    labels = {"num_labels": cfg.num_labels} if cfg.task == "sequence-classification" else {}
    if cfg.model is not None:
        folder = resolve_model_dir(cfg.model)
        model = cls.from_pretrained(folder, dtype="float32", progress=cfg.progress, **labels)
        tok = Tokenizer.from_pretrained(cfg.tokenizer or folder)
        return model, tok, str(cfg.model)
    if cfg.config in (None, ""):
        raise DataError("give --model (a checkpoint to fine-tune) or --config (train from scratch)")
    path = Path(cfg.config)
    config = Zamba2Config.from_json_file(path) if path.suffix == ".json" else Zamba2Config.preset(cfg.config)
    for key, value in labels.items():
        setattr(config, key, value)
    if labels:
        config.validate()
    if cfg.tokenizer is None:
        raise DataError("--config trains from scratch and needs --tokenizer FOLDER")
    torch.manual_seed(cfg.seed)
    model = cls(config)
    return model, Tokenizer.from_pretrained(cfg.tokenizer), None


def _dataset(cfg: TrainConfig, path: str, tok, model, cache: bool = True) -> Rows | Labelled:
    if cfg.task == "sequence-classification":
        return Labelled(path, tok, cfg.seq_len, model.config.num_labels, model.config.label2id)
    return causal_lm_rows(path, tok, cfg.seq_len, Path(cfg.out) / "data-cache" if cache else None)


def _targets(batch: dict[str, torch.Tensor], task: str) -> int:
    if task == "sequence-classification":
        return batch["labels"].shape[0]
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# ---- the loop ------------------------------------------------------------------------------------


class Trainer:
    """Holds the pieces of one run; `run()` trains to the end (or to the next interruption)."""

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.task not in TASKS:
            raise DataError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
        if cfg.task == "sequence-classification" and not cfg.num_labels and cfg.model is None:
            raise DataError("--task sequence-classification needs --num-labels K")
        if cfg.seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {cfg.seq_len}")
        if cfg.dtype not in DTYPES:
            raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        if cfg.optimizer_in_backward and cfg.grad_accum != 1:
            raise DataError(f"--optimizer-in-backward needs --grad-accum 1, got {cfg.grad_accum}")
        if cfg.optimizer_in_backward and cfg.max_grad_norm > 0:
            # a global norm needs every gradient before the first parameter is stepped
            raise DataError(f"--optimizer-in-backward needs --max-grad-norm 0 (no clipping), got {cfg.max_grad_norm:g}")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.dist = distributed.init_distributed(cfg.device, cfg.dist_timeout)  # None in one process
        self.main = self.dist is None or self.dist.is_main  # writes metrics, checkpoints' metadata, the result
        self.device = torch.device(cfg.device) if self.dist is None else self.dist.device
        if self.dist is not None:
            distributed.check_batch(cfg.batch_size, self.dist)
            if cfg.optimizer_in_backward:
                raise DataError("--optimizer-in-backward runs in one process only (not under torchrun)")
        self.model, self.tok, self.base_name = _load_model_and_tokenizer(cfg)
        self.lora = cfg.lora_rank is not None
        if self.lora:
            from zamba2.train import lora

            alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
            lora.add_lora(self.model, cfg.lora_rank, alpha, cfg.lora_targets, cfg.lora_dropout)
        if self.dist is None:  # under torchrun fully_shard moves each unit to the device as it shards it
            self.model.to(self.device)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        if self.dist is not None:  # bf16: FSDP gathers bf16 copies of the fp32 shards, reduces in fp32
            bf16 = torch.bfloat16 if cfg.dtype == "bf16" else None
            distributed.shard_model(self.model, self.dist, param_dtype=bf16)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise DataError("nothing to train: every parameter is frozen")
        # every rank tokenises (the same rows); only rank 0 writes the token cache
        self.train_data = _dataset(cfg, cfg.data, self.tok, self.model, cache=self.main)
        self.eval_data = _dataset(cfg, cfg.eval_data, self.tok, self.model, self.main) if cfg.eval_data else None
        self.rows_per_step = cfg.batch_size * cfg.grad_accum
        if cfg.steps is None:
            epochs = cfg.epochs if cfg.epochs is not None else 1.0
            self.total_steps = max(1, math.ceil(epochs * len(self.train_data) / self.rows_per_step))
        else:
            self.total_steps = cfg.steps
        decay = [p for n, p in self.params if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.params if not (p.dim() >= 2 and "embed" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # torch's fused AdamW: on the 1.2B 6-layer slice's 0.34G parameters here, 0.38 s a step against 1.68 s
        # foreach and 1.99 s for-loop (python -m zamba2.bench.train, one core)
        fused = self.device.type in ("cpu", "cuda")
        adamw = {"lr": cfg.lr, "betas": (0.9, 0.95), "fused": fused or None}
        groups = [g for g in groups if g["params"]]
        # bf16 in one process, or any in-backward step: the optimizer holds fp32 masters of the trainable
        # parameters (in fp32 those are the parameters themselves) and the model computes in bf16
        self.mixed: precision.MixedPrecisionAdamW | None = None
        self.autocast = cfg.dtype == "bf16-autocast" or (cfg.dtype == "bf16" and self.dist is not None)
        if self.dist is None and (cfg.dtype == "bf16" or cfg.optimizer_in_backward):
            dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
            self.mixed = precision.MixedPrecisionAdamW(self.model, groups, dtype, cfg.optimizer_in_backward, **adamw)
            self.optimizer = self.mixed.optimizer
        else:
            self.optimizer = torch.optim.AdamW(groups, **adamw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup, self.total_steps, cfg.min_lr_ratio)
        )
        self.progress = ckpt.Progress()
        self.metrics_path = self.out / "metrics.jsonl"
        self._step_start = (0, 0)  # data position before the step in progress
        self._in_step = False  # between a step's first row and its last update
        if cfg.resume:
            self._resume()
        if self.progress.step == 0:
            tokens = getattr(self.train_data, "tokens", None)
            self._log({"event": "start", "parameters": self.model.num_parameters(), "train_rows": len(self.train_data),
                       "train_targets": tokens, "total_steps": self.total_steps})  # fmt: skip

    # -- state --
    def _masters(self):
        """With fp32 masters, they stand in the model while checkpoints and exports read it (resume writes)."""
        return self.mixed.in_model() if self.mixed is not None else nullcontext()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (fp32 masters under --dtype bf16); call inside `_masters()` to read them."""
        if self.lora:
            from zamba2.train import lora

            return lora.adapter_state_dict(self.model)
        return {n: p for n, p in self.params}

    def _resume(self) -> None:
        folder = ckpt.latest(self.out)
        if folder is None:
            return  # nothing saved yet: a fresh start
        tensors, self.progress, _ = ckpt.load(folder, self.optimizer, self.scheduler)
        with self._masters():
            self._load_trained(folder, tensors)
        self._log({"event": "resumed", "step": self.progress.step, "from": str(folder)})

    def _load_trained(self, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        if (folder / "sharded").is_dir():  # written by N ranks: loads on any number, one process included
            distributed.load_sharded(folder / "sharded", self.model, self.optimizer)
        elif self.dist is not None:
            raise DataError(f"{folder}: written by one process; resume it with one process (no torchrun)")
        elif self.lora:
            from zamba2.train import lora

            lora.load_adapter_state_dict(self.model, tensors)
        else:
            own = dict(self.params)
            missing = sorted(set(own) - set(tensors))
            if missing:
                raise DataError(f"{folder}: checkpoint lacks {missing[0]} (was it written by another run?)")
            with torch.no_grad():
                for name, p in own.items():
                    p.copy_(tensors[name])

    def save_checkpoint(self) -> Path:
        if self.dist is not None:  # every rank writes its shards, then rank 0 the rest (and the rename)
            name = ckpt.checkpoint_name(self.progress.step)
            shards = ckpt.checkpoint_root(self.out) / f".{name}.shards"
            distributed.save_sharded(shards, self.model, self.optimizer)
            if self.main:
                ckpt.save(self.out, None, None, self.scheduler, self.progress, asdict(self.cfg),
                          self.cfg.keep_checkpoints, sharded=shards)  # fmt: skip
            distributed.barrier()
            return ckpt.checkpoint_root(self.out) / name
        with self._masters():
            return ckpt.save(self.out, self.trainable_state(), self.optimizer, self.scheduler, self.progress,
                             asdict(self.cfg), self.cfg.keep_checkpoints)  # fmt: skip

    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    # -- batches --
    def _next_rows(self) -> list[int]:
        """The next batch_size row indices, moving through the epochs' permutations."""
        n = len(self.train_data)
        rows: list[int] = []
        while len(rows) < self.cfg.batch_size:
            order = _order(n, self.cfg.seed, self.progress.epoch)
            take = order[self.progress.row : self.progress.row + self.cfg.batch_size - len(rows)].tolist()
            rows += take
            self.progress.row += len(take)
            if self.progress.row >= n:
                self.progress.epoch += 1
                self.progress.row = 0
        return rows

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            # causal LM: the fused lm_head + cross entropy (the loss alone, no (T, vocab) logits)
            extra = {"loss_only": True} if self.cfg.task != "sequence-classification" else {}
            out = self.model(**batch, use_cache=False, **extra)
        return out

    def train_step(self) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over the step's targets, target tokens)."""
        self.model.train()
        self._step_start = (self.progress.epoch, self.progress.row)
        self._in_step = True
        rows = [self._next_rows() for _ in range(self.cfg.grad_accum)]
        if self.dist is not None:
            rows = [distributed.local_rows(r, self.dist) for r in rows]
        batches = [self.train_data.batch(r) for r in rows]
        counts = [_targets(b, self.cfg.task) for b in batches]
        targets = sum(counts) if self.dist is None else int(distributed.all_sum(sum(counts), self.dist))
        total = max(1, targets)
        # FSDP averages gradients over ranks; scaling by the world size makes that the sum over all targets
        world = 1 if self.dist is None else self.dist.world_size
        loss_sum = 0.0
        for batch, count in zip(batches, counts, strict=True):
            if count == 0:
                if self.dist is not None:  # every rank must run the same forward/backward collectives
                    inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                    (self.model(**inputs, use_cache=False).logits.sum() * 0.0).backward()
                continue
            loss = self._forward(batch).loss
            value = float(loss.detach())
            if self.cfg.optimizer_in_backward and not math.isfinite(value):  # the backward would step on it
                self._stop_on(value)
            scaled = loss * (count * world / total)
            scaled.backward()
            if self.mixed is not None and self.cfg.grad_accum > 1:
                self.mixed.accumulate()  # into the fp32 master gradients: no accumulation in bf16
            loss_sum += value * count
        if self.dist is not None:
            loss_sum = distributed.all_sum(loss_sum, self.dist)
        mean = loss_sum / total
        if not math.isfinite(mean):
            self._stop_on(mean)
        step = self.mixed if self.mixed is not None else self.optimizer
        if self.cfg.max_grad_norm > 0:
            if self.mixed is not None:
                self.mixed.clip_grad_norm_(self.cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
        step.step()  # in-backward: already done parameter by parameter
        step.zero_grad()
        self.scheduler.step()
        self.progress.step += 1
        self.progress.tokens += targets
        self._in_step = False
        return mean, targets

    def _stop_on(self, loss: float) -> None:
        self._in_step = False
        if self.mixed is not None:
            self.mixed.zero_grad()
        raise TrainingStopped(
            f"the loss became {loss} at step {self.progress.step + 1}; stopped without saving it "
            "(lower --lr or check the data); the last good checkpoint is kept"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the held-out set (token-weighted), its perplexity, and accuracy for classification."""
        assert self.eval_data is not None
        self.model.eval()
        n = len(self.eval_data)
        limit = n if self.cfg.eval_batches is None else min(n, self.cfg.eval_batches * self.cfg.batch_size)
        loss_sum, count, correct = 0.0, 0, 0
        for start in range(0, limit, self.cfg.batch_size):
            batch = self.eval_data.batch(list(range(start, min(limit, start + self.cfg.batch_size))))
            c = _targets(batch, self.cfg.task)
            if c == 0:
                continue
            out = self._forward(batch)
            loss_sum += float(out.loss) * c
            count += c
            if self.cfg.task == "sequence-classification":
                correct += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
        loss = loss_sum / max(1, count)
        result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        if self.cfg.task == "sequence-classification":
            result["eval_accuracy"] = correct / max(1, count)
        return result

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="train", unit="step",
                   disable=not cfg.progress or not self.main, dynamic_ncols=True)  # fmt: skip
        last: dict[str, Any] = {}
        try:
            while self.progress.step < self.total_steps:
                t0 = time.perf_counter()
                # in-backward: an interrupt mid-backward would leave half the parameters stepped; it waits
                with precision.interrupts_held(cfg.optimizer_in_backward):
                    loss, tokens = self.train_step()
                dt = time.perf_counter() - t0
                record = {"step": self.progress.step, "loss": round(loss, 5),
                          "lr": self.scheduler.get_last_lr()[0], "tokens": self.progress.tokens,
                          "tokens_per_s": round(tokens / dt, 1), "epoch": self.progress.epoch}  # fmt: skip
                if cfg.eval_every and self.eval_data is not None and self.progress.step % cfg.eval_every == 0:
                    record.update(self.evaluate())
                self._log(record)
                last = record
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
                if cfg.save_every and self.progress.step % cfg.save_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            # an interrupted step never happened: back to its first row, gradients dropped (an interrupt after
            # the step's update keeps it)
            if self._in_step:
                self.progress.epoch, self.progress.row = self._step_start
                self._in_step = False
            (self.mixed or self.optimizer).zero_grad()
            folder = self.save_checkpoint()
            raise TrainingStopped(f"interrupted at step {self.progress.step}; resumable checkpoint in {folder} "
                                  f"(run again with --resume)") from None  # fmt: skip
        finally:
            bar.close()
        if self.eval_data is not None and "eval_loss" not in last:
            last.update(self.evaluate())
            self._log({"step": self.progress.step, **{k: v for k, v in last.items() if k.startswith("eval")}})
        self.save_checkpoint()
        self.export()
        if cfg.plot and self.main:
            from zamba2.train.plot import plot_metrics

            plot_metrics(self.metrics_path, self.out / "loss.png")
        return last

    def export(self) -> None:
        """The result in --out: a PEFT adapter folder (LoRA) or a save_pretrained checkpoint (full). Under
        torchrun rank 0 writes it from a gathered copy (the adapters only, with LoRA)."""
        model = self.model
        if self.dist is not None:
            model = distributed.plain_copy(self.model, self._same_structure, self.dist, trainable_only=self.lora)
            if model is None:
                return
        with self._masters() if model is self.model else nullcontext():  # the fp32 masters are the result
            if self.lora:
                from zamba2.train import lora

                lora.save_adapter(model, self.out, base_model_name_or_path=self.base_name)
            else:
                model.save_pretrained(self.out)
        self.tok.save_pretrained(self.out)

    def _same_structure(self):
        """An empty model shaped like the one trained (LoRA included), for `distributed.plain_copy`."""
        plain = distributed.unwrapped_class(self.model)(self.model.config)
        if self.lora:
            from zamba2.train import lora

            lora.apply_lora(plain, self.model.lora_settings)
        return plain


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` to the end; returns the last metrics record (with held-out loss when --eval-data is given)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(cfg).run()
