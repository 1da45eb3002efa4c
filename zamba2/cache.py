"""The hybrid cache: everything a Zamba2 model carries from one forward call to the next.

Per layer (every layer has a Mamba2 mixer, hybrid layers included):
    conv_states  (L, B, I + 2GN, K-1)   the last K-1 inputs of the depthwise conv, in the model dtype
    ssm_states   (L, B, H, P, N)        the SSM state, always fp32
Per hybrid layer j (its own K/V even when the weights are shared):
    keys, values (J, B, nkv, T_max, d)  model dtype, preallocated, written in place
Per sequence:
    key_mask     (B, T_max) bool        which cached positions are real tokens (False under left padding)
    positions    (B,) long              the RoPE position the next token of each row gets
and `seq_len`, the number of filled K/V slots, shared by all rows (a left-padded batch is aligned on the right).

Everything is allocated once; forward calls write into it. `ensure_capacity` grows K/V by reallocation when a
caller goes past `max_length` (generation sizes the cache up front, so this never happens on its hot path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zamba2.config import Zamba2Config


@dataclass(frozen=True)
class CacheShapes:
    """Widths of the cached tensors: the config's, or one tensor-parallel rank's share of them (its Mamba
    heads and conv channels, its K/V heads; see zamba2/tensor_parallel.py)."""

    conv_dim: int  # I + 2GN
    mamba_heads: int  # H
    kv_heads: int  # nkv

    @classmethod
    def of(cls, config: Zamba2Config) -> CacheShapes:
        return cls(config.mamba_conv_dim, config.n_mamba_heads, config.num_key_value_heads)


class HybridCache:
    def __init__(
        self,
        config: Zamba2Config,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shapes: CacheShapes | None = None,
    ) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.config = config
        shapes = shapes or CacheShapes.of(config)
        L = config.num_hidden_layers
        J = len(config.hybrid_layer_ids)
        d = config.attention_head_dim
        self.conv_states = torch.zeros(
            L, batch_size, shapes.conv_dim, config.mamba_d_conv - 1, dtype=dtype, device=device
        )
        self.ssm_states = torch.zeros(
            L, batch_size, shapes.mamba_heads, config.mamba_headdim, config.mamba_d_state,
            dtype=torch.float32, device=device,
        )  # fmt: skip
        self.keys = torch.zeros(J, batch_size, shapes.kv_heads, max_length, d, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seq_len = 0
        # True once some cached key is padding; lets unpadded decode skip building a mask.
        self.has_padding = False

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.ssm_states.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def get_seq_length(self) -> int:
        """Number of tokens already processed (transformers' Cache API name)."""
        return self.seq_len

    def __len__(self) -> int:
        return self.seq_len

    # ---- writes (called by the model) ------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        if length <= self.max_length:
            return
        new_len = max(length, 2 * self.max_length)
        grow = new_len - self.max_length

        def pad(t: torch.Tensor) -> torch.Tensor:
            extra = t.new_zeros(*t.shape[:3], grow, t.shape[4])
            return torch.cat([t, extra], dim=3)

        self.keys, self.values = pad(self.keys), pad(self.values)
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(self.batch_size, grow)], dim=1)

    def update_kv(self, j: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, d) of hybrid layer j after the cached ones; return all keys/values so far.

        Does not advance `seq_len`: the model calls `advance` once every layer has written.
        """
        T = k.shape[2]
        end = self.seq_len + T
        self.keys[j, :, :, self.seq_len : end] = k.detach()
        self.values[j, :, :, self.seq_len : end] = v.detach()
        return self.keys[j, :, :, :end], self.values[j, :, :, :end]

    def begin(self, mask: torch.Tensor | None, T: int) -> None:
        """Reserve room for T new tokens and record which of them are real (mask (B, T), 1 = token)."""
        self.ensure_capacity(self.seq_len + T)
        if mask is not None:
            real = mask.to(torch.bool)
            self.key_mask[:, self.seq_len : self.seq_len + T] = real
            if not bool(real.all()):
                self.has_padding = True
        else:
            self.key_mask[:, self.seq_len : self.seq_len + T] = True

    def advance(self, T: int, mask: torch.Tensor | None) -> None:
        self.seq_len += T
        self.positions += T if mask is None else mask.to(torch.long).sum(-1)

    # ---- whole-cache operations ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sequence; keeps the allocation."""
        self.conv_states.zero_()
        self.ssm_states.zero_()
        self.key_mask.fill_(True)
        self.positions.zero_()
        self.seq_len = 0
        self.has_padding = False

    def reorder(self, indices: torch.Tensor | list[int]) -> None:
        """Reorder or select batch rows in place (beam search, dropping finished rows)."""
        self.__dict__.update(self.select(indices).__dict__)

    def select(self, indices: torch.Tensor | list[int]) -> HybridCache:
        """A new cache holding copies of the given rows."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        out = object.__new__(HybridCache)
        out.__dict__.update(self.__dict__)  # config, seq_len, has_padding
        for name in ("conv_states", "ssm_states", "keys", "values"):  # batch is dim 1 of these
            setattr(out, name, getattr(self, name).index_select(1, idx))
        out.key_mask = self.key_mask.index_select(0, idx)
        out.positions = self.positions.index_select(0, idx)
        return out

    def memory_bytes(self) -> int:
        tensors = (self.conv_states, self.ssm_states, self.keys, self.values, self.key_mask, self.positions)
        return sum(t.numel() * t.element_size() for t in tensors)
