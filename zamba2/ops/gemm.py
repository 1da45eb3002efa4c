"""bf16 / fp16 matrix products on CPUs that have no fast low-precision GEMM.

torch computes a bf16 product on the CPU with oneDNN where the CPU has AVX-512 (`mkldnn_bf16_supported()`),
and elsewhere with its reference loops, which are slow and depend on the operands' layout. Measured on a
2-core AVX2 EPYC, 512 x 2048 times 2048 x 4096, 2 threads, in GFLOP/s:

    fp32                          64    (every layout)
    bf16  x @ W^T  (F.linear)     10.5
    bf16  dY @ W   (input grad)    0.16
    bf16  dY^T @ X (weight grad)   3.5

There a bf16 training step of the 1.2B slice would take most of an hour in its input gradients alone. The same
product computed as fp32 on upcast operands is the same arithmetic a bf16 GEMM does (bf16 inputs are exact in
fp32, products are accumulated in fp32, the result is rounded to bf16 once), up to the order of the sums, and
runs at the fp32 rate; the upcast of the operands is one pass over each. So on such a CPU `linear` takes that
route for bf16 / fp16 operands with at least UPCAST_MIN_ROWS rows, and so do the depthwise conv (ops/conv.py),
the attention backward (layers/attention.py) and the fused lm_head loss (ops/loss.py). Fewer rows (decode) stay
native: a matrix-vector product is bound by reading the weight, and an fp32 copy of it costs more than it saves.

`ZAMBA2_GEMM=native|upcast` overrides the choice (`auto`, the default, decides by the CPU); `set_mode` does the
same in-process (tests compare the routes). Only the arithmetic's route changes: dtypes in and out, what
autograd saves (the bf16 operands) and the gradients' dtypes are those of the native product.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

MODES = ("auto", "native", "upcast")
# At or above this many rows a product is upcast (where upcasting is on). Decode steps have 1-8 rows.
UPCAST_MIN_ROWS = 16
_LOW = (torch.bfloat16, torch.float16)
_mode: str | None = None  # set_mode's choice; None: the environment's


def set_mode(mode: str | None) -> None:
    """'native', 'upcast', 'auto' (decide by the CPU), or None (back to ZAMBA2_GEMM)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"GEMM mode must be one of {', '.join(MODES)}; got {mode!r}")
    _mode = mode


@functools.cache
def has_native_kernels(dtype: torch.dtype) -> bool:
    """Whether torch has oneDNN kernels for `dtype` products on this CPU (else its reference loops run)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _env_mode() -> str:
    mode = os.environ.get("ZAMBA2_GEMM", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"ZAMBA2_GEMM must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def upcasts(dtype: torch.dtype, device: torch.device, rows: int) -> bool:
    """Whether a product of `dtype` operands with `rows` rows on `device` runs as an fp32 product here."""
    if dtype not in _LOW or device.type != "cpu" or rows < UPCAST_MIN_ROWS:
        return False
    mode = _mode or _env_mode()
    return mode == "upcast" or (mode == "auto" and not has_native_kernels(dtype))


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b in fp32 arithmetic on low-precision operands; saves the low-precision x and W, as the
    native product does, and upcasts them again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _linear32(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()  # (rows, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight.float()).to(x.dtype).view(x.shape)  # (rows, in)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(g.t(), x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)  # (out, in)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = g.sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def _linear32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), x (..., in), weight (out, in), upcast where `upcasts` says so. Under autocast
    the operands are first cast to the autocast dtype, as autocast would (so the rounding is the same)."""
    device, rows = x.device.type, x.numel() // max(x.shape[-1], 1)
    if device != "cpu" or rows < UPCAST_MIN_ROWS:  # off the CPU, and decode: straight to F.linear
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if not upcasts(dtype, x.device, rows):
            return F.linear(x, weight, bias)
        with torch.autocast(device, enabled=False):
            return _upcast(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if x.dtype != weight.dtype or not upcasts(x.dtype, x.device, rows):
        return F.linear(x, weight, bias)
    return _upcast(x, weight, bias)


def _upcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    tracked = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and tracked:
        return _UpcastLinear.apply(x, weight, bias)
    return _linear32(x, weight, bias)
