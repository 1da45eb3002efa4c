"""The causal-LM loss: lm_head and next-token cross entropy, plain and fused.

The plain path (`causal_lm_loss` on logits) materialises the (T, vocab) logits, an fp32 copy of them for the
log-softmax, and as many gradients again in backward: in a small model's training step at 8 x 512 tokens the
log-softmax forward and backward alone took 27% of the time. `fused_linear_cross_entropy` never holds more than
a block of rows of fp32 logits: for each block it computes the logits, their log-sum-exp, the loss and at once the
gradient of the logits (softmax - one-hot, scaled by 1 / number of counted tokens), which it multiplies into the
gradient of the hidden states; the weight's gradient is one GEMM over all rows at the end. The backward then only
scales those two by the upstream gradient. Products run in the dtype the plain path's lm_head would use (the
autocast dtype under autocast), the softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zamba2.ops import gemm

IGNORE_INDEX = -100
# fp32 logits per block of rows: 4M values (16 MB), 128 rows at a 32k vocabulary
BLOCK_VALUES = 1 << 22


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32: logits at t predict labels at t + 1; -100 is ignored."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, weight) would compute in here: the autocast dtype where autocast is on."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, dtype: torch.dtype):
        # h (N, H), weight (V, H), labels (N,) long; returns the mean loss over counted rows (fp32 scalar).
        # Autocast is off in here: the products are cast to `dtype` by hand, and mm with out= has no autocast.
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropy._forward(ctx, h, weight, labels, dtype)

    @staticmethod
    def _forward(ctx, h, weight, labels, dtype: torch.dtype):
        n, V = h.shape[0], weight.shape[0]
        # Products in `dtype`, or in fp32 on its exact upcasts where zamba2/ops/gemm.py says so (once here, not
        # once per block); `rounded` then rounds what the native product would take in `dtype`.
        wide = gemm.upcasts(dtype, h.device, n)
        hc, w = h.to(dtype), weight.to(dtype)
        if wide:
            hc, w = hc.float(), w.float()
        rounded = (lambda t: t.to(dtype).float()) if wide else (lambda t: t.to(dtype))
        counted = labels != IGNORE_INDEX
        scale = 1.0 / counted.sum().float()  # inf when nothing counts: the loss is then NaN, as in F.cross_entropy
        safe = labels.masked_fill(~counted, 0)
        need_w = ctx.needs_input_grad[1]
        dlogits = torch.empty(n, V, dtype=dtype, device=h.device) if need_w else None
        dh = torch.empty(n, h.shape[1], dtype=hc.dtype, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = max(1, BLOCK_VALUES // V)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = rounded(F.linear(hc[start:end], w)).float()  # (rows, V)
            lse = torch.logsumexp(z, dim=-1)  # (rows,)
            tgt, keep = safe[start:end], counted[start:end]
            picked = z.gather(1, tgt[:, None])[:, 0]
            total += ((lse - picked) * keep).sum()
            # d loss / d z = (softmax(z) - onehot(label)) * scale on counted rows, 0 elsewhere
            g = z.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, tgt[:, None], torch.full_like(picked[:, None], -1.0))
            g.mul_((keep * scale)[:, None])
            g = rounded(g)
            torch.mm(g, w, out=dh[start:end])
            if need_w:
                dlogits[start:end] = g
        dw = None  # (V, H)
        if need_w and not wide:
            dw = torch.mm(dlogits.t(), hc)
        elif need_w:  # by blocks of vocabulary rows, so no fp32 (V, H) product exists at once
            dw = torch.empty(V, h.shape[1], dtype=dtype, device=h.device)
            step = max(1, BLOCK_VALUES // h.shape[1])
            for v0 in range(0, V, step):
                dw[v0 : v0 + step] = torch.mm(dlogits[:, v0 : v0 + step].float().t(), hc)
        ctx.save_for_backward(dh, dw) if need_w else ctx.save_for_backward(dh)
        ctx.h_dtype, ctx.w_dtype, ctx.need_w = h.dtype, weight.dtype, need_w
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        # The upstream gradient is usually exactly 1 (loss.backward()): then no pass over the (V, H) gradient.
        one = bool(grad == 1)
        dh, dw = ctx.saved_tensors[0], ctx.saved_tensors[1] if ctx.need_w else None
        dh = dh.to(ctx.h_dtype) if one else (dh * grad.to(dh.dtype)).to(ctx.h_dtype)
        if dw is not None:
            dw = dw.to(ctx.w_dtype) if one else (dw * grad.to(dw.dtype)).to(ctx.w_dtype)
        return dh, dw, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss(F.linear(h, weight), labels)` without the logits: h (B, T, H), weight (V, H), labels (B, T).

    Same value and gradients up to rounding (tests compare them in fp32)."""
    if h.shape[1] < 2:
        raise ValueError(f"the causal-LM loss needs at least 2 positions per row; got {h.shape[1]}")
    hs = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), H): position t predicts label t + 1
    ls = labels[:, 1:].reshape(-1).to(h.device)
    return _LinearCrossEntropy.apply(hs, weight, ls, _compute_dtype(h, weight))
