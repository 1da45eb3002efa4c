"""Causal depthwise conv1d over time, as used on x, B and C inside the Mamba2 mixer.

The conv state is the last K-1 inputs (B, C, K-1), in the activations' dtype. A zero state is the same as
the zero left-padding of a plain causal conv, so a prompt's first chunk needs no special case.

Packed rows: with `seq_idx` (B, T), a document index per position (each document one contiguous run), an
output never reads an input of another document, as if every document started from a zero state; a given state
belongs to the row's first document. `conv_reference` runs the documents one by one (tests only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zamba2.ops import gemm
from zamba2.packing import document_spans


def conv_full(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt path. x (B, T, C), weight (C, K), state (B, C, K-1) or None (zeros), seq_idx (B, T) or None.

    Returns the conv output before activation (B, T, C) and the new state: the last K-1 inputs, taken
    from the state when T < K-1 (with `seq_idx`, those of the last document only, zeros before it).
    """
    b, T, Ch = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, C, T)
    if state is None:
        state = xt.new_zeros(b, Ch, K - 1)
    window = torch.cat([state.to(xt.dtype), xt], dim=-1)  # (B, C, K-1+T)
    out = _depthwise(window, weight[:, None, :].to(xt.dtype), bias)  # (B, C, T)
    if seq_idx is not None:
        return _cut_at_documents(out.transpose(1, 2), window, weight, bias, seq_idx)
    return out.transpose(1, 2), window[..., -(K - 1) :]


def _depthwise(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv1d(window, weight, bias, groups=C). In fp32 where zamba2/ops/gemm.py upcasts products: the CPUs
    without oneDNN's bf16 kernels have none for this conv either (C = 4352, 512 steps: bf16 100 ms, fp32 7 ms)."""
    if not gemm.upcasts(window.dtype, window.device, window.shape[-1]):
        return F.conv1d(window, weight, bias, groups=window.shape[1])
    b = None if bias is None else bias.to(window.dtype).float()
    with torch.autocast(window.device.type, enabled=False):
        return F.conv1d(window.float(), weight.float(), b, groups=window.shape[1]).to(window.dtype)


# With autograd and no state (training), the mixer's conv + SiLU runs as one autograd function (`conv_silu`) that
# keeps only its input and recomputes the conv in backward. Tests turn this off to compare with the plain path.
FUSED_BACKWARD = True


def conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(conv_full(x, weight, bias, None, seq_idx)[0]) with a fused backward: x (B, T, C), weight (C, K)."""
    return _ConvSilu.apply(x, weight, bias, seq_idx)


class _ConvSilu(torch.autograd.Function):
    """Forward as `conv_full` + SiLU. Backward in fp32 over time-major taps, window[t] = x[t - (K-1)]:
    pre_t = b + sum_k w_k window[t+k],  dpre = dout silu'(pre),  dw_k = sum_t dpre_t window[t+k],
    dwindow[t+k] += w_k dpre_t, db = sum_t dpre_t; with `seq_idx` each tap that crosses a document start is 0."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        ctx.save_for_backward(x, weight, bias, seq_idx)
        return F.silu(conv_full(x, weight, bias, None, seq_idx)[0])

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx = ctx.saved_tensors
        b, T, Ch = x.shape
        K = weight.shape[-1]
        window = torch.cat([x.new_zeros(b, K - 1, Ch, dtype=torch.float32), x.float()], dim=1)  # (B, K-1+T, C)
        w = weight.float()
        same = [None] * K  # (B, T, 1) 0/1 per tap with documents; tap K-1 reads the position itself
        if seq_idx is not None:
            docs = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)
            same[: K - 1] = [(docs[:, k : k + T] == seq_idx)[..., None].float() for k in range(K - 1)]
        taps = [window[:, k : k + T] if same[k] is None else window[:, k : k + T] * same[k] for k in range(K)]
        pre = taps[K - 1] * w[:, K - 1]
        for k in range(K - 1):
            pre.addcmul_(taps[k], w[:, k])
        if bias is not None:
            pre += bias.float()
        sig = torch.sigmoid(pre)
        dpre = pre.mul_(1 - sig).add_(1).mul_(sig).mul_(dout)  # silu'(pre) dout, in pre's buffer
        dw = torch.stack([(dpre * taps[k]).sum((0, 1)) for k in range(K)], dim=-1)  # (C, K)
        dwin = torch.zeros_like(window)
        for k in range(K):
            g = dpre * w[:, k] if same[k] is None else dpre * w[:, k] * same[k]
            dwin[:, k : k + T] += g
        db = dpre.sum((0, 1)).to(bias.dtype) if bias is not None else None
        return dwin[:, K - 1 :].to(x.dtype), dw.to(weight.dtype), db, None


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """Decode path. x (B, C); `state` (B, C, K-1) is shifted in place. Returns (B, C) before activation."""
    window = torch.cat([state, x[..., None].to(state.dtype)], dim=-1)  # (B, C, K)
    state.copy_(window[..., 1:])
    out = (window * weight.to(window.dtype)).sum(-1)
    return out + bias if bias is not None else out


def conv_steps(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """T decode steps at once, each output bit for bit as `conv_step` computes it: x (B, T, C), state (B, C, K-1),
    which is left as it is. Returns the outputs before activation (B, T, C) and the state after the T inputs.

    For the few tokens of a speculative verification. Channels stay innermost and the K taps are a loop: each
    product is rounded to the window's dtype and the products are summed in fp32 in tap order, then rounded once,
    which is what conv_step's `(window * weight).sum(-1)` does. At the default model's width (C = 640, bf16,
    9 tokens, one core) F.conv1d measured ~0.9 ms a call, an unfold-and-sum over the taps ~0.25-0.6 ms (a
    reduction over an inner dimension of 4), this ~75 us."""
    K, T = weight.shape[-1], x.shape[1]
    window = torch.cat([state.transpose(1, 2), x.to(state.dtype)], dim=1)  # (B, K-1+T, C)
    w = weight.to(window.dtype).t().contiguous()  # (K, C): a strided row would make each product ~15x slower
    out = (window[:, :T] * w[0]).float()  # (B, T, C): tap 0 reads the oldest input
    for k in range(1, K):
        out += window[:, k : k + T] * w[k]
    out = out.to(window.dtype)
    if bias is not None:
        out = out + bias
    return out, window[:, T:].transpose(1, 2)


def _cut_at_documents(
    out: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain conv's output (B, T, C) is right except at the K-1 first positions of each document, whose
    taps reach into the document before: those few positions are recomputed from their own document's taps
    alone (not corrected by subtraction, which would cancel in bf16). window (B, C, K-1+T) as in `conv_full`.
    Measured at 1.2B shapes (512 tokens, C = 4352, 4 documents, one busy core): forward + backward 1.05-1.2x the
    plain conv, the forward's extra ops ~3 ms next to its ~30 ms. Masking the K taps at every position measured
    1.4-1.7x, and laying the documents out apart with zeros between them for one plain conv 1.2-1.35x."""
    b, T = seq_idx.shape
    K = weight.shape[-1]
    docs = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)  # (B, K-1+T): the state is document 0's
    same = docs.unfold(1, K, 1) == seq_idx[..., None]  # (B, T, K): tap k of position t reads t - (K-1-k)
    rows, cols = (~same).any(-1).nonzero(as_tuple=True)  # (M,): the positions to recompute
    if rows.numel():
        taps = cols[:, None] + torch.arange(K, device=cols.device)  # (M, K) indices into the window
        inputs = window.transpose(1, 2)[rows[:, None], taps]  # (M, K, C)
        kept = same[rows, cols].to(inputs.dtype)[..., None]  # (M, K, 1)
        fixed = (inputs * kept * weight.t().to(inputs.dtype)).sum(1)  # (M, C)
        if bias is not None:
            fixed = fixed + bias.to(fixed.dtype)
        if torch.is_grad_enabled() and fixed.requires_grad:
            # out of place: autograd through a write into the transposed view measured 1.5-2x slower
            out = out.index_put((rows, cols), fixed.to(out.dtype))
        else:
            out.index_put_((rows, cols), fixed.to(out.dtype))
    last = (docs[:, -(K - 1) :] == seq_idx[:, -1:])[:, None].to(window.dtype)  # (B, 1, K-1)
    return out, window[..., -(K - 1) :] * last


def conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    seq_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tests only: `conv_full` of each document alone (zero state, the given one for a row's first document)."""
    b, T, Ch = x.shape
    K = weight.shape[-1]
    out = torch.empty_like(x)
    new_state = x.new_zeros(b, Ch, K - 1)
    for row in range(b):
        for n, (lo, hi) in enumerate(document_spans(seq_idx[row])):
            s0 = state[row : row + 1] if state is not None and n == 0 else None
            out[row : row + 1, lo:hi], last = conv_full(x[row : row + 1, lo:hi], weight, bias, s0)
        new_state[row] = last[0]
    return out, new_state
