"""bf16 compute weights with fp32 master copies in the optimizer (`zamba2 train --dtype bf16`).

    model parameters  bf16   forward and backward run on them: no autocast casts, bf16 gradients
    masters           fp32   one per trainable parameter, outside the model; AdamW (torch's, fused) updates these
    step:   grads -> fp32 (bucket by bucket) [* clip coefficient];  AdamW on the masters;  masters -> bf16 params

Under autocast every fp32 weight is cast to bf16 in the forward and every bf16 weight gradient back to fp32 in
the backward (about 0.75 s of a 4.5 s step on the 1.2B slice here); this recipe moves those casts into the step,
where they are one pass over each tensor, and it drops the bf16 weight copies autocast keeps for the backward.
The masters are the training state: checkpoints hold them (`in_model`), and the bf16 parameters are always
exactly `master.to(bf16)`, so a resumed run continues bit for bit.

Gradients of a micro-batch are folded into fp32 master gradients at once when a step has several
(`accumulate`), so accumulation never adds in bf16. With `in_backward=True` each parameter is stepped as soon as
its gradient is complete (`Tensor.register_post_accumulate_grad_hook`) and its gradient freed at once, so the
whole set of gradients never exists; that needs one micro-batch per step and no global-norm clipping.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# fp32 gradients alive at once in `step`: 32M values (128 MB), a few of the 1.2B's largest matrices. They are
# written into one buffer kept from step to step: fresh fp32 tensors for every gradient of the 1.2B slice cost
# 1.4 s of page faults a step here, against 0.16 s for the same copies into memory already mapped.
BUCKET_VALUES = 1 << 25


class MixedPrecisionAdamW:
    """AdamW over fp32 masters of a model's trainable parameters, the model itself cast to `dtype`.

    `groups` are torch.optim param groups over the model's (still fp32) parameters; the masters are taken from
    them before the cast (the fp32 tensors themselves, no copy), then every floating tensor of `model` becomes
    `dtype`. `optimizer` is the AdamW over the masters (for the scheduler and checkpoints)."""

    def __init__(
        self,
        model: nn.Module,
        groups: list[dict],
        dtype: torch.dtype = torch.bfloat16,
        in_backward: bool = False,
        **adamw,
    ) -> None:
        self.params: list[nn.Parameter] = [p for g in groups for p in g["params"]]
        bad = [p.dtype for p in self.params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"master weights are taken from fp32 parameters; got a {bad[0]} one")
        self.masters = [p.detach() for p in self.params]  # keeps the fp32 storage once .data is replaced below
        self.master_of = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        model.to(dtype)
        index = {id(p): i for i, p in enumerate(self.params)}
        master_groups = [{**g, "params": [self.masters[index[id(p)]] for p in g["params"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(master_groups, **adamw)
        self.in_backward = in_backward
        self.stepped: set[int] = set()  # in_backward: parameters stepped during the current backward
        self.clip_coef: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None  # (max(BUCKET_VALUES, largest parameter),) fp32, made on first use
        self.accumulated: list[torch.Tensor] | None = None  # fp32 sums of micro-batch gradients (accumulate)
        self.summed: set[int] = set()  # indices of the parameters with a sum in `accumulated` this step
        if in_backward:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._step_one)

    # ---- gradients --------------------------------------------------------------------------------

    def _buffer(self) -> torch.Tensor:
        if self.buffer is None:
            sizes = [m.numel() for m in self.masters]  # a LoRA's factors may hold less than one bucket in all
            size = max(min(BUCKET_VALUES, sum(sizes)), *sizes)
            self.buffer = torch.empty(size, device=self.masters[0].device)
        return self.buffer

    @torch.no_grad()
    def accumulate(self) -> None:
        """Fold the model's gradients into fp32 sums and free them (between micro-batches: a sum in bf16 would
        round every micro-batch's share). The sums are kept from step to step (see BUCKET_VALUES)."""
        if self.accumulated is None:
            self.accumulated = [torch.empty_like(m) for m in self.masters]
        for i, (p, acc) in enumerate(zip(self.params, self.accumulated, strict=True)):
            if p.grad is None:
                continue
            if i in self.summed:
                acc.add_(p.grad)
            else:
                acc.copy_(p.grad)
                self.summed.add(i)
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of all gradients, taken in fp32; `step` then scales them by
        min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does."""
        if self.summed:
            grads = [self.accumulated[i] for i in sorted(self.summed)]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        self.clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    # ---- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the masters bucket by bucket (the fp32 gradients of one bucket at a time), then each
        updated master copied into its bf16 parameter."""
        if self.in_backward:
            self._finish_backward_step()
            return
        if self.summed:  # the fp32 sums are the gradients: one pass (a parameter without any gradient stays)
            indices = sorted(self.summed)
            for i in indices:
                self.masters[i].grad = self.accumulated[i]
            self._step_bucket(indices)
            self.summed.clear()
        else:
            buffer = self._buffer()
            bucket: list[int] = []
            size = 0
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                if size + p.numel() > buffer.numel():
                    self._step_bucket(bucket)
                    bucket, size = [], 0
                # the bucket's fp32 gradients are consecutive views of the buffer
                self.masters[i].grad = buffer[size : size + p.numel()].view(p.shape).copy_(p.grad)
                p.grad = None
                bucket.append(i)
                size += p.numel()
            if bucket:
                self._step_bucket(bucket)
        self.clip_coef = None

    def _step_bucket(self, indices: list[int]) -> None:
        """AdamW on the masters `indices` (their fp32 gradients set), then their bf16 parameters updated."""
        masters = [self.masters[i] for i in indices]
        if self.clip_coef is not None:
            torch._foreach_mul_([m.grad for m in masters], self.clip_coef)
        self.optimizer.step()  # AdamW skips every master without a gradient: only this bucket moves
        for m in masters:
            m.grad = None
        torch._foreach_copy_([self.params[i] for i in indices], masters)

    @torch.no_grad()
    def _step_one(self, p: nn.Parameter) -> None:
        """The post-accumulate-grad hook: step this parameter now and free its gradient."""
        if id(p) in self.stepped:
            raise RuntimeError(
                "a parameter's gradient was completed twice in one backward; the optimizer-in-backward step "
                "needs one backward per step (--grad-accum 1)"
            )
        self.stepped.add(id(p))
        m = self.master_of[id(p)]
        m.grad = self._buffer()[: p.numel()].view(p.shape).copy_(p.grad)
        p.grad = None
        self.optimizer.step()
        m.grad = None
        p.copy_(m)

    def _finish_backward_step(self) -> None:
        self.stepped.clear()

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            p.grad = None
            m.grad = None
        self.stepped.clear()
        self.clip_coef = None
        self.summed.clear()

    # ---- the state --------------------------------------------------------------------------------

    @contextmanager
    def in_model(self) -> Iterator[None]:
        """The fp32 masters in place of the bf16 parameters for a while: what checkpoints and exports read
        (and a resume writes). On exit the parameters are bf16 again, recopied from the masters."""
        compute = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m
        try:
            yield
        finally:
            for p, c in zip(self.params, compute, strict=True):
                p.data = c
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)


@contextmanager
def interrupts_held(hold: bool) -> Iterator[None]:
    """With `hold`, a Ctrl-C (SIGINT) inside the block is raised as KeyboardInterrupt when the block ends, not
    where it lands: a step taken in the backward cannot be undone halfway. Main thread only (else no-op)."""
    if not hold or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
