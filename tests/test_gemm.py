"""The upcast route of bf16 products (zamba2/ops/gemm.py) equals the native one up to the order of the sums,
in forward and backward, alone and inside the model; the mode is validated."""

import pytest
import torch
import torch.nn.functional as F

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.ops import gemm
from zamba2.ops.conv import conv_full
from zamba2.ops.loss import fused_linear_cross_entropy


@pytest.fixture
def mode():
    yield gemm.set_mode
    gemm.set_mode(None)


def _leaf(*shape, gen, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=gen) * 0.5).to(dtype).requires_grad_(True)


def test_upcast_linear_is_fp32_arithmetic_on_the_bf16_operands(mode):
    gen = torch.Generator().manual_seed(0)
    x, w, b = _leaf(2, 20, 48, gen=gen), _leaf(24, 48, gen=gen), _leaf(24, gen=gen)
    dy = torch.randn(2, 20, 24, generator=gen).to(torch.bfloat16)
    mode("upcast")
    y = gemm.linear(x, w, b)
    (dx, dw, db) = torch.autograd.grad(y, (x, w, b), dy)
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (x, w, b))
    y32 = F.linear(x32, w32, b32)
    dx32, dw32, db32 = torch.autograd.grad(y32, (x32, w32, b32), dy.float())
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == torch.bfloat16
    torch.testing.assert_close(y, y32.to(torch.bfloat16), rtol=0, atol=0)
    for ours, ref in ((dx, dx32), (dw, dw32), (db, db32)):
        torch.testing.assert_close(ours, ref.to(torch.bfloat16), rtol=0, atol=0)
    mode("native")  # the native bf16 product: the same up to the order of its fp32 sums
    yn = gemm.linear(x, w, b)
    grads = torch.autograd.grad(yn, (x, w, b), dy)
    torch.testing.assert_close(yn, y, rtol=1e-2, atol=1e-2)
    for ours, ref in zip((dx, dw, db), grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=2e-2)


def test_few_rows_stay_native_and_fp32_is_untouched(mode):
    mode("upcast")
    assert not gemm.upcasts(torch.bfloat16, torch.device("cpu"), gemm.UPCAST_MIN_ROWS - 1)
    assert gemm.upcasts(torch.bfloat16, torch.device("cpu"), gemm.UPCAST_MIN_ROWS)
    assert not gemm.upcasts(torch.float32, torch.device("cpu"), 512)
    mode("native")
    assert not gemm.upcasts(torch.bfloat16, torch.device("cpu"), 512)


def test_bad_modes_are_refused(mode, monkeypatch):
    with pytest.raises(ValueError, match="GEMM mode must be one of auto, native, upcast"):
        mode("fast")
    monkeypatch.setenv("ZAMBA2_GEMM", "turbo")
    with pytest.raises(ValueError, match="ZAMBA2_GEMM must be one of"):
        gemm.upcasts(torch.bfloat16, torch.device("cpu"), 512)


def test_upcast_under_autocast_rounds_like_autocast(mode):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 40, generator=gen, requires_grad=True), torch.randn(16, 40, generator=gen)
    w.requires_grad_(True)
    mode("upcast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gemm.linear(x, w)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.detach().to(torch.bfloat16).float(), w.detach().to(torch.bfloat16).float())
    torch.testing.assert_close(y, ref.to(torch.bfloat16), rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32  # autocast's gradients reach the fp32 leaves


def test_conv_and_fused_loss_routes_agree(mode):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 24, generator=gen).to(torch.bfloat16)
    w, b = torch.randn(24, 4, generator=gen).to(torch.bfloat16), torch.randn(24, generator=gen).to(torch.bfloat16)
    h, head = _leaf(2, 40, 32, gen=gen), _leaf(300, 32, gen=gen)
    labels = torch.randint(0, 300, (2, 40), generator=gen)
    out = {}
    for m in ("native", "upcast"):
        mode(m)
        y, state = conv_full(x, w, b)
        loss = fused_linear_cross_entropy(h, head, labels)
        out[m] = (y, state, loss, *torch.autograd.grad(loss, (h, head)))
    for a, b_ in zip(out["native"], out["upcast"], strict=True):
        assert a.dtype == b_.dtype
        torch.testing.assert_close(a, b_, rtol=2e-2, atol=2e-3)


def test_bf16_model_training_step_agrees_across_routes(mode):
    config = Zamba2Config.preset("tiny")
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    results = {}
    for m in ("native", "upcast"):
        mode(m)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, loss_only=True).loss
        loss.backward()
        results[m] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["native"][0], results["upcast"][0], rtol=1e-2, atol=1e-2)
    for name, g in results["native"][1].items():
        other = results["upcast"][1][name]
        rel = (g.float() - other.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert rel < 0.05, (name, float(rel))
