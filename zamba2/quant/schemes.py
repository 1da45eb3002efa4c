"""The int8 and int4 weight schemes as pure functions: quantise, dequantise, and int4 nibble packing.

Schemes (all math in fp32, before any cast):

- int8, symmetric per output channel:  w[n, k] ~= q[n, k] * scales[n],  q in [-127, 127],
  scales[n] = max_k |w[n, k]| / 127 (0 for an all-zero row, whose q are then all 0).
- int4, asymmetric per group of `group_size` consecutive input features:
  w[n, k] ~= (q[n, k] - 8) * scales[n, g] + zeros[n, g],  q in [0, 15],  g = k // group_size.
  `zeros` is the float value of the middle code 8 (torch's kernel convention), i.e. zeros = min + 8 * scale.
"""

from __future__ import annotations

import torch

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
_TINY = torch.finfo(torch.float32).tiny


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")


def check_group_size(group_size: int, in_features: int | None = None) -> None:
    """Raise ValueError unless the int4 kernel accepts `group_size` (and `in_features`, when given)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for int4, got {group_size!r}")
    if in_features is not None and in_features % group_size != 0:
        raise ValueError(
            f"in_features={in_features} is not a multiple of group_size={group_size}; "
            "int4 groups must tile the input dimension exactly"
        )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8. Returns (qweight int8 (out, in), scales fp32 (out,))."""
    _check_weight(weight)
    w = weight.float()  # (N, K)
    amax = w.abs().amax(dim=1)  # (N,)
    if not torch.isfinite(amax).all():
        raise ValueError("weight contains inf or nan; cannot quantize")
    scales = amax / 127
    # An all-zero row has scale 0; dividing by `tiny` instead keeps its codes at exactly 0.
    q = torch.round(w / scales.clamp_min(_TINY)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32 weight from int8 codes and per-row scales."""
    return qweight.float() * scales.float()[:, None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [0, 15] -> uint8 (N, K/2); even column in the low nibble."""
    if codes.shape[-1] % 2 != 0:
        raise ValueError(f"int4 packing needs an even in_features, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 codes (N, K) in [0, 15]; inverse of `pack_int4`."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input features.

    Returns (qweight uint8 (out, in/2) packed nibbles, scales fp32 (out, in/group), zeros fp32 (out,
    in/group)) with w ~= (q - 8) * scale + zero.
    """
    _check_weight(weight)
    n, k = weight.shape
    check_group_size(group_size, k)
    w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, group)
    lo = w.amin(dim=-1)  # (N, G)
    hi = w.amax(dim=-1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("weight contains inf or nan; cannot quantize")
    scales = (hi - lo) / 15
    # A constant group gets scale 0: its codes are 0 and `zeros` alone carries the value, exactly.
    q = torch.round((w - lo[..., None]) / scales.clamp_min(_TINY)[..., None]).clamp_(0, 15)
    zeros = lo + 8 * scales  # the value of the middle code, the kernel's zero-point convention
    return pack_int4(q.reshape(n, k)), scales, zeros


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """(out, in) fp32 weight from packed int4 codes and per-group scales / zeros."""
    codes = unpack_int4(qweight).float()  # (N, K)
    n, k = codes.shape
    codes = codes.reshape(n, k // group_size, group_size)
    w = (codes - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)
