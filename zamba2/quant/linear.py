"""QuantizedLinear: a drop-in for nn.Linear with int8 / int4 weight codes, and the CPU kernels it calls.

Persisted format (`state_dict()` of a QuantizedLinear, e.g. under the prefix `lm_head.`):

    qweight  int8  (out, in)              int8 mode
             uint8 (out, in // 2)         int4 mode: two codes per byte, the even input column in the
                                          low nibble, the odd one in the high nibble
    scales   fp32  (out,)                 int8 mode
             fp32  (out, in // group)     int4 mode
    zeros    fp32  (out, in // group)     int4 mode only
    bias     model dtype (out,)           only when the source nn.Linear had one

The int4 layout made by `torch._convert_weight_to_int4pack_for_cpu` interleaves rows in blocks whose
size depends on out_features; it is a private detail of the CPU kernel, so it is never persisted. It is
built from `qweight` on the first CPU forward and cached (as are scales cast to the activation dtype);
the cache is dropped when buffers are loaded or moved. In int4 mode the cache holds a second copy of
the weight codes, so resident memory is about twice `weight_bytes()`. Column ranges used through
`forward_columns` (the shared block's q/k/v, applied to concat(hidden, embeddings) half by half) get
their own cached kernel copies: in int8 that is one more copy of those codes.

Kernel facts checked against torch 2.13 (CPU), which the code below relies on:

- `_weight_int8pack_mm(x, qweight, scales)`: x 2-D (M, K), contiguous last dim, bf16 / fp16 / fp32;
  qweight int8 (N, K) contiguous; scales (N,) of exactly x's dtype. No constraint on N or K.
- `_convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)`: codes int32 (N, K) in [0, 15];
  N % 16 == 0; returns uint8 (N, K / 2); inner_k_tiles has no effect on CPU.
- `_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`: x 2-D, bf16 / fp16 / fp32;
  group_size in {32, 64, 128, 256}; K % group_size == 0; scales_and_zeros (K / group_size, N, 2) of
  exactly x's dtype, [..., 0] the scale and [..., 1] the zero in the convention of schemes.py.
- Neither kernel has an autograd formula; inputs that require grad take the reference path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.ops import gemm
from zamba2.quant.schemes import (
    MODES,
    _check_weight,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# When True, every QuantizedLinear uses dequantise-then-matmul, also on CPU. Tests flip it through
# `reference_kernels()`.
FORCE_REFERENCE = False

# Inputs with at least this many rows (prompt chunks) dequantise the weight and use the plain GEMM; fewer rows
# (decode, batches, short prompts) use the fused kernels. The crossovers measured on the 2-core VM, 8512x2048 bf16
# (`python -m zamba2.bench.kernels` times the kernels): int8 kernel 5.2 ms vs dequantise + GEMM 5.4 ms at 32 rows,
# 7.3 vs 6.6 at 48; int4 (whose dequantisation costs ~8 ms) 4.7 vs 11.2 ms at 32 rows, 14.4 vs 14.0 at 96.
DEQUANTIZE_ROWS = {"int8": 32, "int4": 96}

# The CPU int4 packer needs out_features % 16 == 0; other sizes are padded with zero rows.
_INT4_ROW_MULTIPLE = 16
# Rows quantised per step in `QuantizedLinear.from_weight`, bounding the transient fp32 copy.
_ROW_CHUNK = 4096


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block, QuantizedLinear runs the plain dequantise-then-matmul path."""
    global FORCE_REFERENCE
    previous = FORCE_REFERENCE
    FORCE_REFERENCE = True
    try:
        yield
    finally:
        FORCE_REFERENCE = previous


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least `numel` elements of `like`'s dtype and device, shared by every QuantizedLinear.

    A weight dequantised for a prompt chunk lives for one F.linear only, so one buffer the size of the largest
    weight serves all layers. Allocating it afresh each call costs more than the dequantisation itself here: a
    buffer that large comes from mmap, and every page of it faults on first write. Not for concurrent use (the
    model runs on one thread).
    """
    key = (like.device, like.dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one before allocating the larger
        buf = _SCRATCH[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf


class QuantizedLinear(nn.Module):
    """A drop-in for nn.Linear whose weight is stored as int8 or grouped int4 codes.

    On CPU, forward calls torch's fused weight-only kernels with activations in bf16 / fp16 / fp32;
    anywhere else (CUDA, meta, other dtypes, inputs requiring grad, or under `reference_kernels()`) it
    dequantises to the activation dtype and calls F.linear. Inference only: the codes are buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str = "int8",
        group_size: int = 64,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.group_size: int | None = None
        if mode == "int8":
            codes_shape = (out_features, in_features)
            scales_shape = (out_features,)
            codes_dtype = torch.int8
        else:
            check_group_size(group_size, in_features)
            self.group_size = group_size
            codes_shape = (out_features, in_features // 2)  # two 4-bit codes per byte
            scales_shape = (out_features, in_features // group_size)
            codes_dtype = torch.uint8
        self.register_buffer("qweight", torch.zeros(codes_shape, dtype=codes_dtype, device=device))
        self.register_buffer("scales", torch.zeros(scales_shape, dtype=torch.float32, device=device))
        if mode == "int4":
            self.register_buffer("zeros", torch.zeros(scales_shape, dtype=torch.float32, device=device))
        # Bias stays in the model dtype; a Parameter so it keys as `bias` exactly like nn.Linear's.
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # Kernel-ready tensors per (activation dtype, start, stop) column range, tagged with the buffers they were
        # derived from: {key: (sources, tensors)}.
        self._kernel_cache: dict[tuple[torch.dtype, int, int], tuple[tuple[torch.Tensor, ...], ...]] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 64
    ) -> QuantizedLinear:
        """Quantise an (out, in) weight (in fp32, a row chunk at a time); the float weight is not kept."""
        _check_weight(weight)
        out_features, in_features = weight.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        module = cls(
            in_features,
            out_features,
            mode,
            group_size,
            bias=bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            for start in range(0, out_features, _ROW_CHUNK):
                rows = slice(start, start + _ROW_CHUNK)
                if mode == "int8":
                    q, s = quantize_int8(weight[rows])
                    module.qweight[rows] = q
                    module.scales[rows] = s
                else:
                    q, s, z = quantize_int4(weight[rows], group_size)
                    module.qweight[rows] = q
                    module.scales[rows] = s
                    module.zeros[rows] = z
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = 64) -> QuantizedLinear:
        """Quantise an nn.Linear; bias (if any) keeps the linear's dtype."""
        return cls.from_weight(linear.weight.detach(), linear.bias, mode, group_size)

    # -- forward --------------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) weight the codes stand for, in fp32 (reference path and tests)."""
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def dequantized_as(
        self, dtype: torch.dtype, out: torch.Tensor | None = None, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The (out, in) weight in `dtype`, computed in that dtype (for many-row inputs such as prefill); only the
        input features [start, stop) when `columns` is given (whole int4 groups, see `can_take_columns`).

        `out`: a contiguous buffer of at least out*in elements of `dtype` to write into (see `_scratch`).
        """
        start, stop = (0, self.in_features) if columns is None else columns
        n, k = self.out_features, stop - start
        w = torch.empty(n * k, dtype=dtype, device=self.qweight.device) if out is None else out[: n * k]
        w = w.view(n, k)
        if self.mode == "int8":
            # |q| <= 127 is exact in bf16
            return w.copy_(self.qweight[:, start:stop]).mul_(self.scales.to(dtype)[:, None])
        # Codes go straight into the output, converted on the way: even columns from the low nibbles, odd from
        # the high ones. Then (q - 8) * s + z == q * s + (z - 8 s), as two in-place broadcasts (a broadcasting
        # addcmul measured 4x slower on CPU).
        packed = self.qweight[:, start // 2 : stop // 2]
        groups_of = slice(start // self.group_size, stop // self.group_size)
        scales, zeros = self.scales[:, groups_of], self.zeros[:, groups_of]
        pairs = w.view(n, k // 2, 2)
        pairs[..., 0].copy_(packed & 0x0F)
        pairs[..., 1].copy_(packed >> 4)
        groups = w.view(n, k // self.group_size, self.group_size)
        groups.mul_(scales.to(dtype)[..., None]).add_((zeros - 8 * scales).to(dtype)[..., None])
        return w

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return (
            not FORCE_REFERENCE
            and x.device.type == "cpu"
            and self.qweight.device.type == "cpu"
            and x.dtype in KERNEL_DTYPES
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def _kernel_tensors(self, dtype: torch.dtype, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """(weight, scales) for int8 or (packed, scales_and_zeros) for int4, ready for `dtype` inputs, for the
        input features [start, stop) (the whole weight: 0, in_features).

        Rebuilt whenever a buffer was replaced (`.to()`, assignment); loading clears the cache.
        """
        sources = (self.qweight, self.scales) + ((self.zeros,) if self.mode == "int4" else ())
        key = (dtype, start, stop)
        cached = self._kernel_cache.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            return cached[1]
        if self.mode == "int8":
            # The kernel wants scales in exactly the activation dtype (and the codes row-contiguous: a column
            # range is copied out, the whole weight is used as it is).
            tensors = (self.qweight[:, start:stop].contiguous(), self.scales.to(dtype).contiguous())
        else:
            n_pad = -self.out_features % _INT4_ROW_MULTIPLE
            groups = slice(start // self.group_size, stop // self.group_size)
            codes = unpack_int4(self.qweight)[:, start:stop].to(torch.int32)  # (N, K')
            scales, zeros = self.scales[:, groups], self.zeros[:, groups]  # (N, G')
            if n_pad:
                # Padding rows have code 8, scale 0, zero 0: weight 0; their outputs are sliced away.
                codes = F.pad(codes, (0, 0, 0, n_pad), value=8)
                scales = F.pad(scales, (0, 0, 0, n_pad))
                zeros = F.pad(zeros, (0, 0, 0, n_pad))
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)  # inner_k_tiles: unused on CPU
            # (G', N, 2): [..., 0] scale, [..., 1] zero, in exactly the activation dtype.
            scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()
            tensors = (packed, scales_and_zeros)
        self._kernel_cache[key] = (sources, tensors)
        return tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features={self.in_features}")
        y = self._product(x, 0, self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def can_take_columns(self, start: int, stop: int) -> bool:
        """Whether `forward_columns(x, start, stop)` works: int4 ranges must hold whole groups."""
        if not 0 <= start < stop <= self.in_features:
            return False
        return self.mode == "int8" or (start % self.group_size == 0 and stop % self.group_size == 0)

    def forward_columns(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (..., stop - start) times the input features [start, stop) of the weight, without bias.

        For callers that hold an input in pieces and reuse one piece's product (shared attention's
        concat(hidden, embeddings)). The kernels get their own contiguous copy of the column range, built on
        first use and cached like the whole-weight tensors (int8: one more copy of those codes).
        """
        if not self.can_take_columns(start, stop):
            raise ValueError(
                f"columns [{start}, {stop}) of a {self.mode} weight with in_features={self.in_features}"
                + (f" and group_size={self.group_size}" if self.mode == "int4" else "")
                + " cannot be taken apart (int4 ranges must hold whole groups)"
            )
        if x.shape[-1] != stop - start:
            raise ValueError(f"input last dim {x.shape[-1]} != {stop - start} columns [{start}, {stop})")
        return self._product(x, start, stop)

    def _product(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (..., stop - start) @ W[:, start:stop]^T, without bias."""
        if not self._use_kernel(x):
            return gemm.linear(x, self.dequantized_weight()[:, start:stop].to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, stop - start).contiguous()  # (M, K'): both kernels take 2-D, row-contiguous
        if x2.shape[0] >= DEQUANTIZE_ROWS[self.mode]:
            # Many rows (prefill): the fused kernels are GEMV-shaped and slow here; dequantising once per call
            # (only the columns asked for) and using the dtype's GEMM costs one pass over those codes and runs at
            # matmul speed.
            scratch = _scratch(self.out_features * self.in_features, x)
            return gemm.linear(x, self.dequantized_as(x.dtype, out=scratch, columns=(start, stop)))
        weight, scales = self._kernel_tensors(x.dtype, start, stop)
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(x2, weight, scales)  # (M, N)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, scales)  # (M, N padded)
            if y.shape[-1] != self.out_features:
                y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Loading copies into the buffers in place, so the derived kernel tensors would go stale.
        self._kernel_cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def weight_bytes(self, scale_dtype: torch.dtype | None = None) -> int:
        """Bytes of the codes plus scales (and zeros), i.e. what one forward streams.

        `scale_dtype` counts scales / zeros at that element size (the kernel reads them in the
        activation dtype); by default they count as stored.
        """
        total = self.qweight.numel() * self.qweight.element_size()
        for t in (self.scales, getattr(self, "zeros", None)):
            if t is not None:
                dtype = t.dtype if scale_dtype is None else scale_dtype
                total += t.numel() * dtype.itemsize
        return total

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}{group}"
        )
