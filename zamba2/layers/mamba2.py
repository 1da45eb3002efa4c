"""The Mamba2 mixer: in_proj -> causal conv + SiLU -> SSD scan -> gated RMSNorm -> out_proj.

Two named paths: `prefill` (any number of tokens, chunked scan, optionally continuing from a cache) and `step`
(one token per row, recurrent update of the cached state in place). `forward` picks one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.ops import ssd
from zamba2.ops.conv import conv_full, conv_step
from zamba2.ops.norms import GatedRMSNorm
from zamba2.ops.ssd import ssd_chunked

# Prompt scan chunk: the config's chunk_size, capped here. Results do not depend on it beyond fp32 rounding; the
# per-chunk (Q x Q) work shrinks with Q while the per-token state work stays, and 64 measured fastest on CPU.
MAX_SCAN_CHUNK = 64


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Zamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.I = config.mamba_intermediate_size
        self.G = config.mamba_ngroups
        self.N = config.mamba_d_state
        self.H = config.n_mamba_heads
        self.P = config.mamba_headdim
        self.conv_dim = config.mamba_conv_dim
        self.chunk_size = min(config.chunk_size, MAX_SCAN_CHUNK)
        self.dt_min, self.dt_max = config.dt_limit
        # in_proj output order: gate z (I), then xBC (I + 2GN), then dt (H)
        self.in_proj = nn.Linear(config.hidden_size, self.I + self.conv_dim + self.H, bias=config.add_bias_linear)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim,
            padding=config.mamba_d_conv - 1, bias=config.use_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm = GatedRMSNorm(self.I, group_size=self.I // self.G, eps=1e-5)
        self.out_proj = nn.Linear(self.I, config.hidden_size, bias=config.add_bias_linear)

    @torch.no_grad()
    def init_ssm_parameters(self, config: Zamba2Config) -> None:
        """dt_bias = softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max]; A_log = log(1..H); D = 1."""
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.H) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias), clamped to the same range in prefill and decode; fp32."""
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        return dt.clamp(min=self.dt_min, max=self.dt_max)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: HybridCache | None = None
    ) -> torch.Tensor:
        """x (B, T, hidden), already normalised; mask (B, T) with 0 at padding."""
        if cache is not None and cache.seq_len > 0 and x.shape[1] == 1:
            return self.step(x, cache)
        return self.prefill(x, mask, cache)

    def prefill(self, x: torch.Tensor, mask: torch.Tensor | None, cache: HybridCache | None) -> torch.Tensor:
        b, T, _ = x.shape
        m = None if mask is None else mask[..., None].to(x.dtype)  # (B, T, 1)
        if m is not None:
            x = x * m  # padding contributes nothing to the conv or the state
        z, xBC, dt = self.in_proj(x).split([self.I, self.conv_dim, self.H], dim=-1)
        continuing = cache is not None and cache.seq_len > 0
        conv_state = cache.conv_states[self.layer_idx] if continuing else None
        xBC, new_conv_state = conv_full(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        xBC = F.silu(xBC)
        if m is not None:
            xBC = xBC * m  # zero again: the conv bias made padding positions non-zero
        xs, Bm, Cm = xBC.split([self.I, self.G * self.N, self.G * self.N], dim=-1)
        y, state = ssd_chunked(
            xs.view(b, T, self.H, self.P),
            self._dt(dt),
            -torch.exp(self.A_log.float()),
            Bm.view(b, T, self.G, self.N),
            Cm.view(b, T, self.G, self.N),
            self.D,
            self.chunk_size,
            initial_state=cache.ssm_states[self.layer_idx] if continuing else None,
        )
        if cache is not None:
            cache.conv_states[self.layer_idx].copy_(new_conv_state.detach())
            cache.ssm_states[self.layer_idx].copy_(state.detach())
        y = self.norm(y.view(b, T, self.I), z, out_dtype=x.dtype)
        return self.out_proj(y)

    def step(self, x: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One token per row: x (B, 1, hidden). Updates the conv and SSM states of this layer in place."""
        b = x.shape[0]
        z, xBC, dt = self.in_proj(x[:, 0]).split([self.I, self.conv_dim, self.H], dim=-1)
        xBC = F.silu(conv_step(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, cache.conv_states[self.layer_idx]))
        xs, Bm, Cm = xBC.split([self.I, self.G * self.N, self.G * self.N], dim=-1)
        y = ssd.step(
            cache.ssm_states[self.layer_idx],
            xs.view(b, self.H, self.P),
            self._dt(dt),
            -torch.exp(self.A_log.float()),
            Bm.view(b, self.G, self.N),
            Cm.view(b, self.G, self.N),
            self.D,
        )
        y = self.norm(y.view(b, 1, self.I), z[:, None], out_dtype=x.dtype)
        return self.out_proj(y)
