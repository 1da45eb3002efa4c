"""The Mamba2 mixer: in_proj -> causal conv + SiLU -> SSD scan -> gated RMSNorm -> out_proj.

Three named paths: `prefill` (any number of tokens, chunked scan, optionally continuing from a cache), `step`
(one token per row, recurrent update of the cached state in place) and `speculate` (while the cache speculates:
the prefill math without writing the cached state, its scan inputs recorded for `HybridCache.commit`).
`forward` picks one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.layers.linear import Linear
from zamba2.ops import compiled, conv
from zamba2.ops.conv import conv_step
from zamba2.ops.norms import GatedRMSNorm, gated_rms_norm
from zamba2.ops.ssd import ssd_chunked, ssd_step, ssd_step_fused

# Prompt scan chunk: the config's chunk_size, capped here. Results do not depend on it beyond fp32 rounding; the
# per-chunk (Q x Q) work shrinks with Q while the per-token state work stays. On CPU, at 1.2B and 512 tokens,
# 32 measured 15-25% faster than 64 once x is converted to fp32 a chunk at a time (and 16 slower again).
MAX_SCAN_CHUNK = 32


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
        self.in_proj = Linear(config.hidden_size, self.I + self.conv_dim + self.H, bias=config.add_bias_linear)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim,
            padding=config.mamba_d_conv - 1, bias=config.use_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm = GatedRMSNorm(self.I, group_size=self.I // self.G, eps=1e-5)
        self.out_proj = Linear(self.I, config.hidden_size, bias=config.add_bias_linear)

    @torch.no_grad()
    def init_ssm_parameters(self, config: Zamba2Config) -> None:
        """dt_bias = softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max]; A_log = log(1..H); D = 1."""
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.H) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden), already normalised; mask (B, T) with 0 at padding; seq_idx (B, T) document index
        of packed rows (the conv and the scan restart at each document), or None."""
        if cache is not None and cache.speculation is not None:
            return self.speculate(x, mask, cache)
        if cache is not None and cache.seq_len > 0 and x.shape[1] == 1:
            return self.step(x, cache)
        return self.prefill(x, mask, cache, seq_idx)

    def prefill(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: HybridCache | None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, T, _ = x.shape
        m = None if mask is None else mask[..., None].to(x.dtype)  # (B, T, 1)
        if m is not None:
            x = x * m  # padding contributes nothing to the conv or the state
        z, xBC, dt = self.in_proj(x).split([self.I, self.conv_dim, self.H], dim=-1)
        continuing = cache is not None and cache.seq_len > 0
        conv_state = cache.conv_states[self.layer_idx] if continuing else None
        w, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if cache is None and conv.FUSED_BACKWARD and torch.is_grad_enabled() and (xBC.requires_grad or w.requires_grad):
            xBC, new_conv_state = conv.conv_silu(xBC, w, bias, seq_idx), None  # training: the fused backward
        else:
            xBC, new_conv_state = conv.conv_full(xBC, w, bias, conv_state, seq_idx)
            xBC = F.silu(xBC)
        if m is not None:
            xBC = xBC * m  # zero again: the conv bias made padding positions non-zero
        xs, Bm, Cm = xBC.split([self.I, self.G * self.N, self.G * self.N], dim=-1)
        y, state = ssd_chunked(
            xs.view(b, T, self.H, self.P),
            dt_activation(dt, self.dt_bias, self.dt_min, self.dt_max),
            -torch.exp(self.A_log.float()),
            Bm.view(b, T, self.G, self.N),
            Cm.view(b, T, self.G, self.N),
            self.D,
            self.chunk_size,
            initial_state=cache.ssm_states[self.layer_idx] if continuing else None,
            seq_idx=seq_idx,
        )
        if cache is not None:
            cache.conv_states[self.layer_idx].copy_(new_conv_state.detach())
            cache.ssm_states[self.layer_idx].copy_(state.detach())
        y = self.norm(y.view(b, T, self.I), z, out_dtype=x.dtype)
        return self.out_proj(y)

    def speculate(self, x: torch.Tensor, mask: torch.Tensor | None, cache: HybridCache) -> torch.Tensor:
        """x (B, T, hidden) while `cache` speculates (zamba2/cache.py): the prefill math continuing from this
        layer's running speculative state. The committed conv/SSM states are left as they are; the tokens'
        weight-free scan inputs go to the cache, from which `cache.commit(n)` sets the state after n of them."""
        if mask is not None:
            raise ValueError("speculation feeds unpadded tokens only: pass no attention_mask (or all ones)")
        b, T, _ = x.shape
        conv_state, ssm_state = cache.speculative_state(self.layer_idx)
        z, xBC_in, dt = self.in_proj(x).split([self.I, self.conv_dim, self.H], dim=-1)
        xBC, conv_state = conv.conv_steps(xBC_in, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        xs, Bm, Cm = F.silu(xBC).split([self.I, self.G * self.N, self.G * self.N], dim=-1)
        xs, Bm, Cm = xs.view(b, T, self.H, self.P), Bm.view(b, T, self.G, self.N), Cm.view(b, T, self.G, self.N)
        dt = dt_activation(dt, self.dt_bias, self.dt_min, self.dt_max)  # (B, T, H) fp32
        A = -torch.exp(self.A_log.float())
        if T == 1:  # a draft model's step: the recurrence on a copy (measured ~10% faster than the chunked form)
            ssm_state = ssm_state.clone()
            y = ssd_step(ssm_state, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], self.D)[:, None]
        else:
            y, ssm_state = ssd_chunked(xs, dt, A, Bm, Cm, self.D, self.chunk_size, initial_state=ssm_state)
        cache.record_speculation(
            self.layer_idx, xBC_in, dt * A, xs.float() * dt[..., None], Bm, conv_state, ssm_state
        )  # fmt: skip
        y = self.norm(y.view(b, T, self.I), z, out_dtype=x.dtype)
        return self.out_proj(y)

    def step(self, x: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One token per row: x (B, 1, hidden). Updates the conv and SSM states of this layer in place."""
        args = (
            self.in_proj(x[:, 0]), cache.conv_states[self.layer_idx], self.conv1d.weight[:, 0], self.conv1d.bias,
            cache.ssm_states[self.layer_idx], self.dt_bias, self.A_log, self.D, self.norm.weight,
            self.dt_min, self.dt_max, self.norm.eps,
        )  # fmt: skip
        return self.out_proj(compiled.run(decode_step_fused, *args, eager=decode_step))


def dt_activation(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float) -> torch.Tensor:
    """softplus(dt + dt_bias), clamped to the same range in prefill and decode; fp32."""
    return F.softplus(dt_raw.float() + dt_bias.float()).clamp(min=dt_min, max=dt_max)


def _decode_step(
    scan, zxbcdt, conv_state, conv_w, conv_b, ssm_state, dt_bias, A_log, D, norm_w, dt_min, dt_max, eps
) -> torch.Tensor:  # fmt: skip
    """The mixer's decode step between in_proj and out_proj, one token per row.

    zxbcdt (B, I + C + H) is the in_proj output; conv_state (B, C, K-1) and ssm_state (B, H, P, N) fp32 are
    updated in place. Returns the gated-normed y (B, 1, I) in zxbcdt's dtype. Sizes come from the shapes (H from
    dt_bias, I from norm_w, C from conv_w, N from the state), so one compiled graph serves every layer.
    """
    b, H, P, N = ssm_state.shape
    I, C = norm_w.shape[0], conv_w.shape[0]
    G = (C - I) // (2 * N)
    z, xBC, dt = zxbcdt.split([I, C, H], dim=-1)
    xBC = F.silu(conv_step(xBC, conv_w, conv_b, conv_state))
    xs, Bm, Cm = xBC.split([I, G * N, G * N], dim=-1)
    dt = dt_activation(dt, dt_bias, dt_min, dt_max)
    y = scan(ssm_state, xs.view(b, H, P), dt, -torch.exp(A_log.float()), Bm.view(b, G, N), Cm.view(b, G, N), D)
    return gated_rms_norm(y.view(b, 1, I), z[:, None], norm_w, I // G, eps, zxbcdt.dtype)


def decode_step(*args) -> torch.Tensor:
    """Eager decode step: `_decode_step` with the three-pass in-place scan."""
    return _decode_step(ssd_step, *args)


def decode_step_fused(*args) -> torch.Tensor:
    """The same step for torch.compile (`--compile`): conv, scan and norm fuse into a few kernels."""
    return _decode_step(ssd_step_fused, *args)
