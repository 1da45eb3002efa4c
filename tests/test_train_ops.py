"""Training fast paths equal their plain autograd paths (values and gradients, fp32)."""

import pytest
import torch

from zamba2.ops import ssd
from zamba2.ops.ssd_grad import ssd_chunked_autograd


def _scan_inputs(seed, b=2, T=23, H=4, P=6, N=5, groups=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, T, H, P, generator=g),
        dt=torch.rand(b, T, H, generator=g) * 0.3 + 0.05,
        A=-torch.rand(H, generator=g) * 3 - 0.5,
        B=torch.randn(b, T, groups, N, generator=g),
        C=torch.randn(b, T, groups, N, generator=g),
        D=torch.randn(H, generator=g),
        initial_state=torch.randn(b, H, P, N, generator=g),
    )


def _grads(fn, inputs, seed):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, s = fn(**leaves)
    g = torch.Generator().manual_seed(seed + 1)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    loss.backward()
    return y.detach(), s.detach(), {k: v.grad for k, v in leaves.items()}


def _close(name, a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(1.0, scale), f"{name}: max difference {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_autograd_scan_equals_plain_autograd(chunk, groups, monkeypatch):
    inputs = _scan_inputs(chunk, groups=groups, T=41)

    def plain(**kw):
        monkeypatch.setattr(ssd, "FUSED_BACKWARD", False)
        return ssd.ssd_chunked(**kw, chunk_size=chunk)

    def fused(**kw):
        return ssd_chunked_autograd(**kw, chunk_size=chunk)

    y0, s0, g0 = _grads(plain, inputs, chunk)
    y1, s1, g1 = _grads(fused, inputs, chunk)
    _close("y", y1, y0)
    _close("state", s1, s0)
    for k in g0:
        _close(f"d{k}", g1[k], g0[k])


@pytest.mark.parametrize("chunk", [4, 16])
def test_autograd_scan_with_documents_equals_plain_autograd(chunk, monkeypatch):
    """Packed rows (seq_idx): documents starting mid-chunk, at a chunk start, and one of a single token."""
    inputs = _scan_inputs(3, groups=2, T=37)
    seq_idx = torch.tensor([[0] * 6 + [1] + [2] * 10 + [3] * 20, [0] * 16 + [1] * 21])

    def plain(**kw):
        monkeypatch.setattr(ssd, "FUSED_BACKWARD", False)
        return ssd.ssd_chunked(**kw, chunk_size=chunk, seq_idx=seq_idx)

    def fused(**kw):
        return ssd_chunked_autograd(**kw, chunk_size=chunk, seq_idx=seq_idx)

    y0, s0, g0 = _grads(plain, inputs, chunk)
    y1, s1, g1 = _grads(fused, inputs, chunk)
    _close("y", y1, y0)
    _close("state", s1, s0)
    for k in g0:
        _close(f"d{k}", g1[k], g0[k])


@pytest.mark.parametrize("block", [1 << 22, 300])  # one block of rows, or blocks of 3 rows at a vocabulary of 100
def test_fused_linear_cross_entropy_equals_plain(block, monkeypatch):
    from zamba2.ops import loss as lossmod

    monkeypatch.setattr(lossmod, "BLOCK_VALUES", block)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 9, 16, generator=g)
    w = torch.randn(100, 16, generator=g) * 0.3
    labels = torch.randint(0, 100, (2, 9), generator=g)
    labels[0, 3] = labels[1, 5] = -100
    grads = []
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            value = lossmod.fused_linear_cross_entropy(hh, ww, labels)
        else:
            value = lossmod.causal_lm_loss(torch.nn.functional.linear(hh, ww), labels)
        (value * 1.7).backward()  # an upstream gradient other than 1
        grads.append((value.detach(), hh.grad, ww.grad))
    for name, a, b in zip(("loss", "dh", "dweight"), grads[1], grads[0], strict=True):
        _close(name, a, b)


def test_fused_loss_in_the_model_equals_plain(monkeypatch):
    """loss_only=True: the same loss and every parameter's gradient as the default path (fp32, padded batch,
    tied lm_head), logits None."""
    from zamba2.config import Zamba2Config
    from zamba2.model import Zamba2ForCausalLM
    from zamba2.ops import loss as lossmod

    monkeypatch.setattr(lossmod, "BLOCK_VALUES", 32000 * 5)  # blocks of 5 rows
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny")).train()
    ids = torch.randint(3, 32000, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for loss_only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=labels, loss_only=loss_only)
        out.loss.backward()
        assert (out.logits is None) == loss_only
        results.append((out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    _close("loss", results[1][0], results[0][0])
    for k, g in results[0][1].items():
        _close(k, results[1][1][k], g)
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, loss_only=True)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_autograd_equals_plain(weight_dtype, monkeypatch):
    from zamba2.ops import norms

    g = torch.Generator().manual_seed(8)
    y, gate = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    w = (torch.rand(16, generator=g) + 0.5).to(weight_dtype)
    dout = torch.randn(2, 5, 16, generator=g)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(norms, "FUSED_BACKWARD", fused)
        leaves = [t.clone().requires_grad_() for t in (y, gate, w)]
        out = norms.gated_rms_norm(*leaves, 8, 1e-5, torch.float32)
        (out * dout).sum().backward()
        results.append((out.detach(), *(t.grad for t in leaves)))
    for name, a, b in zip(("out", "dy", "dgate", "dweight"), results[1], results[0], strict=True):
        assert a.dtype == b.dtype, name
        _close(name, a.float(), b.float(), tol=1e-5 if weight_dtype == torch.float32 else 1e-2)


def test_gated_norm_autograd_under_autocast_gives_what_the_next_linear_sees():
    """Under bf16 autocast the fused norm returns bf16 where the plain path returns fp32; out_proj casts that to
    bf16 anyway, so its output is the same."""
    from zamba2.ops import norms

    g = torch.Generator().manual_seed(9)
    y = torch.randn(1, 6, 32, generator=g, requires_grad=True)
    gate = torch.randn(1, 6, 32, generator=g).bfloat16()
    w = torch.rand(32, generator=g) + 0.5
    lin = torch.randn(8, 32, generator=g)
    outs = []
    for fused in (False, True):
        norms.FUSED_BACKWARD = fused
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                n = norms.gated_rms_norm(y, gate, w, 16, 1e-5, torch.bfloat16)
                outs.append((n.dtype, torch.nn.functional.linear(n, lin)))
        finally:
            norms.FUSED_BACKWARD = True
    assert outs[0][0] == torch.float32 and outs[1][0] == torch.bfloat16
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("documents", [False, True])
def test_conv_silu_autograd_equals_plain(documents):
    from zamba2.ops import conv

    g = torch.Generator().manual_seed(10)
    b, T, Ch, K = 2, 11, 6, 4
    x, w, bias = torch.randn(b, T, Ch, generator=g), torch.randn(Ch, K, generator=g), torch.randn(Ch, generator=g)
    seq_idx = torch.tensor([[0] * 3 + [1] + [2] * 7, [0] * 11]) if documents else None
    dout = torch.randn(b, T, Ch, generator=g)
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
        if fused:
            out = conv.conv_silu(*leaves, seq_idx)
        else:
            out = torch.nn.functional.silu(conv.conv_full(*leaves, None, seq_idx)[0])
        (out * dout).sum().backward()
        results.append((out.detach(), *(t.grad for t in leaves)))
    for name, a, c in zip(("out", "dx", "dweight", "dbias"), results[1], results[0], strict=True):
        _close(name, a, c)


def test_model_gradients_with_all_fast_paths_equal_plain(monkeypatch):
    """The whole model, fp32, padded and packed rows: every fused backward on against all of them off."""
    from zamba2.config import Zamba2Config
    from zamba2.model import Zamba2ForCausalLM
    from zamba2.ops import conv, norms

    torch.manual_seed(1)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny", chunk_size=4)).train()
    ids = torch.randint(3, 32000, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    position_ids = torch.cat([torch.arange(7), torch.arange(12)])[None].expand(2, -1)
    results = []
    for fused in (False, True):
        for mod in (ssd, norms, conv):
            monkeypatch.setattr(mod, "FUSED_BACKWARD", fused)
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss = loss + model(ids[:1], position_ids=position_ids[:1], labels=ids[:1], use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    _close("loss", results[1][0], results[0][0])
    for k, g in results[0][1].items():
        _close(k, results[1][1][k], g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_autograd_equals_plain(dtype, monkeypatch):
    from zamba2.ops import norms

    g = torch.Generator().manual_seed(11)
    x, dout = torch.randn(2, 5, 16, generator=g).to(dtype), torch.randn(2, 5, 16, generator=g).to(dtype)
    w = (torch.rand(16, generator=g) + 0.5).to(dtype)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(norms, "FUSED_BACKWARD", fused)
        norm = norms.RMSNorm(16).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        (out * dout).sum().backward()
        results.append((out.detach(), leaf.grad, norm.weight.grad))
    for name, a, b in zip(("out", "dx", "dweight"), results[1], results[0], strict=True):
        assert a.dtype == b.dtype, name
        _close(name, a.float(), b.float(), tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inv_rms_autograd_equals_plain(dtype, monkeypatch):
    """The 1/RMS the shared block computes once for its norm and its q/k/v split."""
    from zamba2.ops import norms

    g = torch.Generator().manual_seed(12)
    x, dr = torch.randn(2, 5, 16, generator=g).to(dtype), torch.randn(2, 5, 1, generator=g)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(norms, "FUSED_BACKWARD", fused)
        leaf = x.clone().requires_grad_()
        r = norms.RMSNorm(16).inv_rms(leaf)
        (r * dr).sum().backward()
        results.append((r.detach(), leaf.grad))
    for name, a, b in zip(("r", "dx"), results[1], results[0], strict=True):
        assert a.dtype == b.dtype, name
        _close(name, a.float(), b.float(), tol=1e-5 if dtype == torch.float32 else 1e-2)
