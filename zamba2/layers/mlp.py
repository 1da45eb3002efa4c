"""Gated MLP of a shared block, with a low-rank adapter on gate_up for every hybrid layer it serves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.config import Zamba2Config
from zamba2.layers.attention import low_rank_adapter, use_linear
from zamba2.layers.linear import Linear

_ACT = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


class SharedMLP(nn.Module):
    def __init__(self, config: Zamba2Config, slots: list[int]) -> None:
        super().__init__()
        H, Fdim = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(H, 2 * Fdim, bias=config.add_bias_linear)  # first half is the gate
        self.down_proj = Linear(Fdim, H, bias=config.add_bias_linear)
        self.act = _ACT[config.hidden_act]
        self.gate_up_proj_adapter_list = nn.ModuleDict(
            {str(j): low_rank_adapter(H, config.adapter_rank, 2 * Fdim) for j in slots}
        )

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        # (B, T, 2F): the largest activation of a prompt chunk, so the adapter is added in place
        gate_up = use_linear(self.gate_up_proj, x, slot)
        gate_up += self.gate_up_proj_adapter_list[str(slot)](x)
        gate, up = gate_up.chunk(2, dim=-1)
        return use_linear(self.down_proj, self.act(gate) * up, slot)
