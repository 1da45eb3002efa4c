"""Rotary position embeddings over the full attention head dim, rotate-half convention."""

from __future__ import annotations

import torch


def rope_tables(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) long -> cos, sin (B, T, head_dim) in `dtype`, computed in fp32.

    inv_freq_i = 1 / base^(2i/d). `base` is the config's rope_base (the long-context rescale is applied there).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d); cos/sin (B, T, d)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
