"""Fast paths equal plain paths: chunked scan vs the sequential recurrence, conv prefill vs conv steps."""

import pytest
import torch

from zamba2.ops.conv import conv_full, conv_step
from zamba2.ops.ssd import ssd_chunked, ssd_reference


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_equals_recurrence(chunk, groups):
    g = torch.Generator().manual_seed(chunk)
    b, T, H, P, N = 2, 23, 4, 6, 5
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 0.3
    A = -torch.arange(1, H + 1, dtype=torch.float32)
    B, C = torch.randn(b, T, groups, N, generator=g), torch.randn(b, T, groups, N, generator=g)
    D = torch.randn(H, generator=g)
    s0 = torch.randn(b, H, P, N, generator=g)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk, initial_state=s0)
    yr, sr = ssd_reference(x, dt, A, B, C, D, initial_state=s0)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_in_place_equals_autograd_path(groups):
    """Without autograd the carried state is updated in place; with it, out of place. Same numbers, gradients
    flow, and the caller's initial state is left alone either way."""
    g = torch.Generator().manual_seed(5)
    b, T, H, P, N = 2, 19, 4, 3, 5
    x, dt = torch.randn(b, T, H, P, generator=g), torch.rand(b, T, H, generator=g) * 0.3
    A, D = -torch.arange(1, H + 1, dtype=torch.float32), torch.randn(H, generator=g)
    B, C = torch.randn(b, T, groups, N, generator=g), torch.randn(b, T, groups, N, generator=g)
    s0 = torch.randn(b, H, P, N, generator=g)
    kept = s0.clone()
    with torch.no_grad():
        y, s = ssd_chunked(x, dt, A, B, C, D, 8, initial_state=s0)
    xg = x.clone().requires_grad_()
    yg, sg = ssd_chunked(xg, dt, A, B, C, D, 8, initial_state=s0)
    (yg.sum() + sg.sum()).backward()
    torch.testing.assert_close(y, yg.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, sg.detach(), rtol=1e-6, atol=1e-6)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert torch.equal(s0, kept)
    # an initial state with other strides (a permuted copy) gives the same result
    odd = s0.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    with torch.no_grad():
        y2, s2 = ssd_chunked(x, dt, A, B, C, D, 8, initial_state=odd)
    assert torch.equal(y2, y) and torch.equal(s2, s) and torch.equal(odd, kept)


def test_gated_rms_norm_in_place_equals_autograd_path():
    from zamba2.ops.norms import gated_rms_norm

    g = torch.Generator().manual_seed(6)
    y, gate = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g).bfloat16()
    w = torch.rand(16, generator=g).bfloat16()
    with torch.no_grad():
        fast = gated_rms_norm(y, gate, w, 8, 1e-5, torch.bfloat16)
    plain = gated_rms_norm(y, gate, w.clone().requires_grad_(), 8, 1e-5, torch.bfloat16)
    assert fast.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(fast, plain.detach())
    with torch.no_grad():  # fp32 norm weight on bf16 activations: promoted as in the autograd path
        assert gated_rms_norm(y, gate, w.float(), 8, 1e-5, torch.bfloat16).dtype == torch.float32


def test_chunked_scan_stable_with_strong_decay():
    """Large dt * A inside one chunk: decays underflow to zero cleanly, no inf or NaN."""
    b, T, H, P, N = 1, 64, 2, 3, 4
    x, B, C = torch.randn(b, T, H, P), torch.randn(b, T, 1, N), torch.randn(b, T, 1, N)
    dt = torch.full((b, T, H), 5.0)
    A = torch.tensor([-20.0, -40.0])
    y, _ = ssd_chunked(x, dt, A, B, C, torch.zeros(H), chunk_size=64)
    yr, _ = ssd_reference(x, dt, A, B, C, torch.zeros(H))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_conv_prefill_equals_steps():
    g = torch.Generator().manual_seed(0)
    b, T, Ch, K = 2, 9, 6, 4
    x, w, bias = torch.randn(b, T, Ch, generator=g), torch.randn(Ch, K, generator=g), torch.randn(Ch, generator=g)
    full, state_full = conv_full(x, w, bias)
    state = torch.zeros(b, Ch, K - 1)
    steps = torch.stack([conv_step(x[:, t], w, bias, state) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full)
    torch.testing.assert_close(state, state_full)
    # a prompt shorter than the kernel keeps part of the old state
    more, st2 = conv_full(x[:, :2], w, bias, state_full)
    assert st2.shape == (b, Ch, K - 1)
    torch.testing.assert_close(st2[..., :1], state_full[..., 2:])


def test_compiled_decode_step_equals_eager():
    """The torch.compile fast path (opt-in) equals the eager step; skipped where compile is unavailable."""
    from zamba2.ops import compiled, ssd

    g = torch.Generator().manual_seed(3)
    b, H, P, N, G = 2, 4, 8, 16, 2
    state = torch.randn(b, H, P, N, generator=g)
    args = (torch.randn(b, H, P, generator=g), torch.rand(b, H, generator=g), -torch.rand(H, generator=g),
            torch.randn(b, G, N, generator=g), torch.randn(b, G, N, generator=g),
            torch.randn(H, generator=g))  # fmt: skip
    s_eager = state.clone()
    y_eager = ssd.ssd_step(s_eager, *args)
    s_fused = state.clone()
    y_fused = ssd.ssd_step_fused(s_fused, *args)  # eagerly: the same math in the fused form
    torch.testing.assert_close(y_fused, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_fused, s_eager, rtol=1e-6, atol=1e-6)
    s_fast = state.clone()
    compiled.enable(True)
    try:
        with torch.no_grad():
            y_fast = compiled.run(ssd.ssd_step_fused, s_fast, *args, eager=ssd.ssd_step)
    finally:
        compiled.enable(False)
    torch.testing.assert_close(y_fast, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_fast, s_eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_steps_equal_sequential_conv_step_bitwise(dtype):
    """The verification's few-token conv gives exactly what T decode steps give (greedy speculation relies on it)."""
    from zamba2.ops.conv import conv_step, conv_steps

    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        b, T, C = 1 + seed % 2, 1 + seed % 9, 96 + 32 * (seed % 3)
        x = torch.randn(b, T, C, generator=g).to(dtype)
        state = torch.randn(b, C, 3, generator=g).to(dtype)
        w, bias = torch.randn(C, 4, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
        out, new_state = conv_steps(x, w, bias if seed % 4 else None, state)
        s = state.clone()
        want = torch.stack([conv_step(x[:, t], w, bias if seed % 4 else None, s) for t in range(T)], dim=1)
        assert torch.equal(out, want) and torch.equal(new_state, s)
