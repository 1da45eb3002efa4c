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
    if seq_idx is not None:
        return _conv_documents(x, weight, bias, state, seq_idx)
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


def _conv_documents(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None, seq_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`conv_full` over packed documents: the K taps as K multiply-adds, each tap masked where it would
    read across a document start. Autograd keeps the window once (the taps are views of it) and (B, T, 1) masks.
    """
    b, T, Ch = x.shape
    K = weight.shape[-1]
    past = x.new_zeros(b, K - 1, Ch) if state is None else state.to(x.dtype).transpose(1, 2)
    window = torch.cat([past, x], dim=1)  # (B, K-1+T, C)
    # the state's positions count as the first document's
    docs = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)  # (B, K-1+T)
    w = weight.to(x.dtype)
    out = window[:, K - 1 :] * w[:, K - 1]  # tap K-1 reads the position itself
    for k in range(K - 1):  # tap k reads K-1-k positions back
        same = (docs[:, k : k + T] == seq_idx)[..., None].to(x.dtype)  # (B, T, 1)
        out = out + window[:, k : k + T] * w[:, k] * same
    if bias is not None:
        out = out + bias.to(x.dtype)
    tail = window[:, -(K - 1) :] * (docs[:, -(K - 1) :] == seq_idx[:, -1:])[..., None].to(x.dtype)
    return out, tail.transpose(1, 2)


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
