"""The linear layer of every projection: nn.Linear (same parameters, init and state_dict keys) whose product
goes through zamba2.ops.gemm, so bf16 weights compute at the fp32 rate on CPUs without a fast bf16 GEMM."""

from __future__ import annotations

import torch
from torch import nn

from zamba2.ops import gemm


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


def is_plain(module: nn.Module) -> bool:
    """A linear layer with nothing wrapped around it (not a LoRA wrapper or a quantised layer)."""
    return type(module) in (nn.Linear, Linear)
