"""zamba2/train/precision.py: fp32 masters behind bf16 parameters, the optimizer step inside the backward.

In fp32 the machinery must equal torch's AdamW on the parameters themselves; in bf16 the masters must take
exactly the step fp32 AdamW takes on the upcast bf16 gradients, and the parameters must be the masters rounded."""

from __future__ import annotations

import copy
import os
import re
import signal

import pytest
import test_train
import torch
from reference import maxdiff
from safetensors.torch import load_file

from zamba2 import Zamba2Config, Zamba2ForCausalLM
from zamba2.train import DataError, Trainer
from zamba2.train.precision import MixedPrecisionAdamW, interrupts_held

tokenizer_dir, corpus, tiny_run = test_train.tokenizer_dir, test_train.corpus, test_train.tiny_run  # fixtures
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def _model(seed: int = 0) -> Zamba2ForCausalLM:
    torch.manual_seed(seed)
    return Zamba2ForCausalLM(Zamba2Config.preset("tiny")).train()


def _batches(n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (2, 12), generator=g) for _ in range(n)]


def _loss(model, ids) -> torch.Tensor:
    return model(ids, labels=ids, use_cache=False, loss_only=True).loss


def _plain_run(model, batches, clip: float = 0.0) -> None:
    opt = torch.optim.AdamW(list(model.parameters()), **ADAMW)
    for ids in batches:
        _loss(model, ids).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        opt.step()
        opt.zero_grad()


def _mixed_run(model, batches, dtype, in_backward=False, clip=0.0) -> MixedPrecisionAdamW:
    mixed = MixedPrecisionAdamW(model, [{"params": list(model.parameters())}], dtype, in_backward, **ADAMW)
    for ids in batches:
        _loss(model, ids).backward()
        if clip:
            mixed.clip_grad_norm_(clip)
        mixed.step()
        mixed.zero_grad()
    return mixed


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, tol: float = 0.0) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    worst = max(maxdiff(pa[k], pb[k]) for k in pa)
    assert worst <= tol, f"max parameter difference {worst:.3e}"


@pytest.mark.parametrize("in_backward", [False, True])
def test_fp32_masters_equal_plain_adamw(in_backward):
    """fp32 'masters' are the parameters themselves: the same steps bit for bit, in the step or in the backward
    (the latter with gradient checkpointing too, which must not complete a gradient twice)."""
    plain, mixed = _model(), _model()
    batches = _batches(3, plain.config.vocab_size)
    _plain_run(plain, batches)
    if in_backward:
        mixed.gradient_checkpointing_enable()
    _mixed_run(mixed, batches, torch.float32, in_backward)
    _assert_same(mixed, plain)


def test_fp32_masters_clip_like_clip_grad_norm():
    plain, mixed = _model(), _model()
    batches = _batches(3, plain.config.vocab_size)
    _plain_run(plain, batches, clip=0.05)
    _mixed_run(mixed, batches, torch.float32, clip=0.05)
    _assert_same(mixed, plain, tol=1e-6)


@pytest.mark.parametrize("in_backward", [False, True])
def test_bf16_masters_take_the_fp32_step_of_the_bf16_gradients(in_backward):
    model = _model()
    reference = copy.deepcopy(model)  # fp32 AdamW fed with the upcast bf16 gradients
    ref_opt = torch.optim.AdamW(list(reference.parameters()), **ADAMW)
    grads: dict[str, torch.Tensor] = {}
    if in_backward:  # the gradients are gone after the backward: record them as they complete (hooks run in order)
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.float()))
    mixed = MixedPrecisionAdamW(model, [{"params": list(model.parameters())}], torch.bfloat16, in_backward, **ADAMW)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for ids in _batches(2, model.config.vocab_size):
        _loss(model, ids).backward()
        if not in_backward:
            grads = {n: p.grad.float() for n, p in model.named_parameters()}
        mixed.step()
        mixed.zero_grad()
        for name, p in reference.named_parameters():
            p.grad = grads[name]
        ref_opt.step()
        ref_opt.zero_grad()
        for (name, p), m in zip(model.named_parameters(), mixed.masters, strict=True):
            assert torch.equal(m, dict(reference.named_parameters())[name].detach()), name
            assert torch.equal(p.detach(), m.to(torch.bfloat16)), name


def test_accumulation_adds_in_fp32():
    model = _model()
    mixed = MixedPrecisionAdamW(model, [{"params": list(model.parameters())}], torch.bfloat16, **ADAMW)
    total: dict[int, torch.Tensor] = {}
    for ids in _batches(3, model.config.vocab_size):
        _loss(model, ids).backward()
        for p in model.parameters():
            total[id(p)] = total.get(id(p), 0) + p.grad.float()
        mixed.accumulate()
        assert all(p.grad is None for p in model.parameters())
    for i, p in enumerate(mixed.params):
        assert torch.equal(mixed.accumulated[i], total[id(p)])


def test_in_model_shows_the_masters_and_restores_bf16():
    model = _model()
    mixed = MixedPrecisionAdamW(model, [{"params": list(model.parameters())}], torch.bfloat16, **ADAMW)
    w = model.lm_head.weight
    with mixed.in_model():
        assert w.dtype == torch.float32 and w.data_ptr() == mixed.master_of[id(w)].data_ptr()
        with torch.no_grad():
            w.add_(1.0)  # as a resume writes the checkpoint into the model
    assert w.dtype == torch.bfloat16
    assert torch.equal(w.detach(), mixed.master_of[id(w)].to(torch.bfloat16))


def test_interrupts_held_until_the_block_ends():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a suite started in the background
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held(True):
            os.kill(os.getpid(), signal.SIGINT)
            done.append(1)  # not interrupted here
    assert done == [1]
    assert signal.getsignal(signal.SIGINT) is before


# ---- the loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, in_backward, accum", [("bf16", False, 2), ("fp32", True, 1), ("bf16", True, 1)]
)  # fmt: skip
def test_resume_is_bitwise_exact_with_masters(tmp_path, tokenizer_dir, corpus, dtype, in_backward, accum):
    kw = dict(dtype=dtype, optimizer_in_backward=in_backward, grad_accum=accum, steps=4)
    if in_backward:
        kw["max_grad_norm"] = 0.0
    whole = Trainer(tiny_run(tmp_path / "a", corpus, tokenizer_dir, **kw))
    whole.run()
    first = Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, **kw))
    while first.progress.step < 2:
        first.train_step()
    first.save_checkpoint()
    resumed = Trainer(tiny_run(tmp_path / "b", corpus, tokenizer_dir, resume=True, **kw))
    assert resumed.progress.step == 2
    resumed.run()
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values())  # the masters
    worst = max(maxdiff(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {worst:.3e}"
    exported = Zamba2ForCausalLM.from_pretrained(tmp_path / "a", progress=False)  # the fp32 masters too
    for name, p in exported.named_parameters():
        assert torch.equal(p.detach(), a[name]), name


REFUSED = [
    (dict(grad_accum=2, max_grad_norm=0), "--grad-accum 1, got 2"),
    (dict(max_grad_norm=1.0), "--max-grad-norm 0 (no clipping), got 1"),
]


@pytest.mark.parametrize("kw, needle", REFUSED)
def test_in_backward_refuses_accumulation_and_clipping(tmp_path, tokenizer_dir, corpus, kw, needle):
    with pytest.raises(DataError, match=re.escape(needle)):
        Trainer(tiny_run(tmp_path, corpus, tokenizer_dir, optimizer_in_backward=True, **kw))
