"""The LoRA-wrapped linears: y = W x + b + scaling * B (A dropout(x)).

Each wrapper is an nn.Linear that reuses the wrapped linear's `weight` and `bias` Parameters, so state_dict()
keeps the checkpoint names, and adds `lora_A` (r, in; Kaiming-uniform) and `lora_B` (out, r; zero): a fresh
adapter is the identity. A linear of a shared block holds one pair per hybrid ordinal ("slot") and takes the
slot from its caller (layers.attention.use_linear). Which linears get wrapped, and the PEFT names, live in
lora.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.layers.linear import Linear
from zamba2.ops import gemm


def _factors(base: nn.Linear, r: int) -> tuple[nn.Linear, nn.Linear]:
    """A (r, in) and B (out, r) on the base's device; fp32 when the base is half precision (as PEFT keeps them),
    so that small updates are not rounded away."""
    w = base.weight
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    A = Linear(base.in_features, r, bias=False, device=w.device, dtype=dtype)
    B = Linear(r, base.out_features, bias=False, device=w.device, dtype=dtype)
    nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
    nn.init.zeros_(B.weight)
    return A, B


class LoraBase(nn.Linear):
    """An nn.Linear that reuses another linear's weight and bias Parameters (same names in state_dict)."""

    per_slot = False

    def __init__(self, base: nn.Linear, scaling: float, dropout: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a weight we do not want
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = scaling
        self.dropout = dropout
        self.merged = False

    def _delta(self, x: torch.Tensor, A: nn.Linear, B: nn.Linear, out_dtype: torch.dtype) -> torch.Tensor:
        """scaling * B A dropout(x), in the factors' dtype, returned in the base output's dtype."""
        x = x.to(A.weight.dtype)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return (B(A(x)) * self.scaling).to(out_dtype)

    def _merge_factors(self, A: nn.Linear, B: nn.Linear, sign: float) -> None:
        delta = (B.weight.float() @ A.weight.float()) * (sign * self.scaling)  # (out, in)
        self.weight.data += delta.to(self.weight.dtype)


class LoraLinear(LoraBase):
    """A linear used once (Mamba projections, a hybrid layer's `linear`, a head): one (A, B) pair."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base, scaling, dropout)
        self.lora_A, self.lora_B = _factors(base, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemm.linear(x, self.weight, self.bias)
        return y if self.merged else y + self._delta(x, self.lora_A, self.lora_B, y.dtype)


class SlotLoraLinear(LoraBase):
    """A linear of a shared block: one (A, B) pair per hybrid ordinal in `slots`, chosen by the caller's slot.
    Slots of the block left out of the targets run the base linear alone."""

    per_slot = True

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float, slots: list[int]) -> None:
        super().__init__(base, scaling, dropout)
        pairs = {str(j): _factors(base, r) for j in slots}
        self.lora_A = nn.ModuleDict({j: a for j, (a, _) in pairs.items()})
        self.lora_B = nn.ModuleDict({j: b for j, (_, b) in pairs.items()})

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        y = gemm.linear(x, self.weight, self.bias)
        key = str(slot)
        if self.merged or key not in self.lora_A:
            return y
        return y + self._delta(x, self.lora_A[key], self.lora_B[key], y.dtype)
