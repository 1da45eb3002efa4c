"""Causal depthwise conv1d over time, as used on x, B and C inside the Mamba2 mixer.

The conv state is the last K-1 inputs (B, C, K-1), in the activations' dtype. A zero state is the same as
the zero left-padding of a plain causal conv, so a prompt's first chunk needs no special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_full(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt path. x (B, T, C), weight (C, K), state (B, C, K-1) or None (zeros).

    Returns the conv output before activation (B, T, C) and the new state: the last K-1 inputs, taken
    from the state when T < K-1.
    """
    b, T, Ch = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, C, T)
    if state is None:
        state = xt.new_zeros(b, Ch, K - 1)
    window = torch.cat([state.to(xt.dtype), xt], dim=-1)  # (B, C, K-1+T)
    out = F.conv1d(window, weight[:, None, :].to(xt.dtype), bias, groups=Ch)  # (B, C, T)
    return out.transpose(1, 2), window[..., -(K - 1) :]


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """Decode path. x (B, C); `state` (B, C, K-1) is shifted in place. Returns (B, C) before activation."""
    window = torch.cat([state, x[..., None].to(state.dtype)], dim=-1)  # (B, C, K)
    state.copy_(window[..., 1:])
    out = (window * weight.to(window.dtype)).sum(-1)
    return out + bias if bias is not None else out
