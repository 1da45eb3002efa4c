"""RMSNorm and the Mamba2 gated, grouped RMSNorm. Both normalise in fp32 and return the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# With autograd, both norms run as one autograd function (`_RMSNormFn`, `_GatedNorm`) that keeps its inputs and
# the 1/RMS and recomputes the rest in backward. Tests turn this off to compare with the plain path.
FUSED_BACKWARD = True


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def inv_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / RMS(x) per position, fp32 (..., 1)."""
        if FUSED_BACKWARD and torch.is_grad_enabled() and x.requires_grad:
            return _InvRMSFn.apply(x, self.eps)
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor, inv_rms: torch.Tensor | None = None) -> torch.Tensor:
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if FUSED_BACKWARD and training:  # recomputes a given inv_rms bit for bit (the same ops)
            return _RMSNormFn.apply(x, self.weight, self.eps)
        r = self.inv_rms(x) if inv_rms is None else inv_rms
        return self.weight * (x.float() * r).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _RMSNormFn(torch.autograd.Function):
    """out = w g with g = x r, r = 1 / RMS(x) (fp32), as RMSNorm.forward. Keeps x in its own dtype and r; autograd
    would keep the fp32 copy of a bf16 x (and g for dw): 4 MB per norm at 512 tokens and 2048 channels.
    Backward: dg = w dout, dx = r (dg - g mean(dg g)), dw = sum over rows of dout g."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, weight, r = ctx.saved_tensors
        g = x.float() * r  # (..., C) fp32
        dw = None
        if ctx.needs_input_grad[1]:  # in the product's dtype, as autograd through `weight * g.to(x.dtype)` gives
            dw = (dout * g.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dg = (dout * weight).to(x.dtype).float()
        dx = (dg - g * (dg * g).mean(-1, keepdim=True)).mul_(r)
        return dx.to(x.dtype), dw, None


class _InvRMSFn(torch.autograd.Function):
    """r = 1 / RMS(x), as RMSNorm.inv_rms, keeping x in its own dtype (not autograd's fp32 copy).
    Backward: dr/dx = -r^3 x / C over the C channels."""

    @staticmethod
    def forward(ctx, x, eps: float):
        r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, r)
        return r

    @staticmethod
    def backward(ctx, dr):
        x, r = ctx.saved_tensors
        return (x.float() * (dr * r.pow(3) * (-1.0 / x.shape[-1]))).to(x.dtype), None


class GatedRMSNorm(nn.Module):
    """y * silu(z), then RMS-normalised in groups of `group_size` channels (gate first, then norm)."""

    def __init__(self, size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return gated_rms_norm(y, gate, self.weight, self.group_size, self.eps, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"




def gated_rms_norm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """weight * groupnorm(y * silu(gate)); y, gate (..., I); the RMS is taken over groups of `group_size`."""
    if torch.is_grad_enabled() and (y.requires_grad or gate.requires_grad or weight.requires_grad):
        if FUSED_BACKWARD:
            return _GatedNorm.apply(y, gate, weight, group_size, eps, out_dtype)
        h = y.float() * F.silu(gate.float())  # (..., I)
        # x * rsqrt(mean(x^2) + eps) over each group (F.rms_norm; on CPU it decomposes into the same ops)
        g = F.rms_norm(h.view(*h.shape[:-1], -1, group_size), (group_size,), eps=eps)  # (..., G, I/G)
        return weight * g.view(h.shape).to(out_dtype)
    # Inference: the same arithmetic in place on one fp32 buffer, bit for bit (a 512-token prompt at 1.2B:
    # 5.0 -> 1.75 ms per layer; each fresh (T, I) fp32 temporary costs about as much as the math).
    h = F.silu(gate.float()).mul_(y)
    hg = h.view(*h.shape[:-1], -1, group_size)  # (..., G, I/G)
    out = hg.mul_(torch.rsqrt(hg.square().mean(-1, keepdim=True).add_(eps))).view(h.shape).to(out_dtype)
    return out.mul_(weight) if weight.dtype == out_dtype else weight * out


class _GatedNorm(torch.autograd.Function):
    """h = y silu(z), g = h r per group with r = 1 / RMS(h), out = w g. Backward, per group of n channels:
    dg = w dout, dh = r (dg - g mean(dg g)), dy = dh silu(z), dz = dh y silu'(z), dw = sum over rows of dout g.

    The output is in promote(w, out_dtype), as `weight * g.to(out_dtype)` gives, except under autocast, where an
    fp32 result would only be cast to the autocast dtype by the next linear: it is returned in that dtype then
    (the same value that linear sees, without keeping an fp32 (T, I) copy)."""

    @staticmethod
    def forward(ctx, y, gate, weight, group_size: int, eps: float, out_dtype: torch.dtype):
        h = F.silu(gate.float()).mul_(y)
        hg = h.view(*h.shape[:-1], -1, group_size)  # (..., G, n)
        r = torch.rsqrt(hg.square().mean(-1, keepdim=True).add_(eps))  # (..., G, 1)
        g = hg.mul_(r).view(h.shape).to(out_dtype)
        dtype = torch.promote_types(weight.dtype, out_dtype)
        device = y.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == out_dtype:
            dtype = out_dtype
        ctx.save_for_backward(y, gate, weight, r)
        ctx.group_size, ctx.y_dtype = group_size, y.dtype
        return (weight * g).to(dtype)

    @staticmethod
    def backward(ctx, dout):
        y, gate, weight, r = ctx.saved_tensors
        n = ctx.group_size
        zf = gate.float()
        sig = torch.sigmoid(zf)
        s = zf * sig  # silu(z)
        yf = y.float()
        g = (yf * s).view(*y.shape[:-1], -1, n).mul_(r)  # (..., G, n) fp32
        do = dout.float()
        dw = (do.view(g.shape) * g).reshape(-1, y.shape[-1]).sum(0)
        dg = (do * weight.float()).view(g.shape)
        dh = (dg - g * (dg * g).mean(-1, keepdim=True)).mul_(r).view(y.shape)
        dy = (dh * s).to(ctx.y_dtype)
        # silu'(z) = sig (1 + z (1 - sig)); zf may be the gate itself (fp32), so it is not written to
        dz = dh.mul_(yf).mul_(sig.mul_(zf * (1 - sig) + 1)).to(gate.dtype)
        return dy, dz, dw.to(weight.dtype), None, None, None
