"""Shared attention of a Zamba2 shared block.

Input is the normalised concat(hidden, original embeddings), width W = 2 * hidden. Head dim d = W / heads and the
score scale is (d / 2)^-0.5, as the published weights were trained with. Optional per-hybrid-layer low-rank
adapters add B_j A_j x to q, k and v; adapter slot j lives here for the hybrid layers this block serves.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.layers.linear import Linear, is_plain
from zamba2.ops import compiled, gemm
from zamba2.ops.rope import apply_rope
from zamba2.quant import QuantizedLinear


def low_rank_adapter(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    """in -> rank -> out, bias-free; `.0` / `.1` are the checkpoint names of the two factors."""
    return nn.Sequential(Linear(d_in, rank, bias=False), Linear(rank, d_out, bias=False))


EmbeddingParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def use_linear(linear: nn.Module, x: torch.Tensor, slot: int) -> torch.Tensor:
    """A shared block's linear applied for hybrid ordinal `slot`. A per-use LoRA (zamba2/train/lora.py) holds
    one adapter per hybrid layer and takes the slot; any other linear is the same for every use."""
    return linear(x, slot) if getattr(linear, "per_slot", False) else linear(x)


def linear_columns(linear: nn.Linear | QuantizedLinear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """x (..., stop - start) times the input features [start, stop) of a bias-free projection's weight."""
    if isinstance(linear, QuantizedLinear):
        return linear.forward_columns(x, start, stop)
    return gemm.linear(x, linear.weight[:, start:stop])


# From this many keys on, eager one-query attention loops over rows and heads (see `one_query`). Per call, batch 1:
# 1.3 ms batched vs 1.9 looped at 512 keys, 4.4 vs 2.7 at 1024, 141.7 vs 19.6 at 16,000. Whole decode steps at 1.2B,
# in-process A/B: batch 1 at 2048 keys 217 -> 195 ms, at 16k 1.0-1.1 s -> 0.26 s; batch 8 at 1024 keys 698 -> 430 ms,
# but at 512 keys 376 -> 399 ms, hence one threshold in keys whatever the batch.
LOOP_KEYS = 1024


def one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query per row and head: q (B, nkv, rep, d), k/v (B, nkv, S, d), allowed (B, 1, 1, S)
    bool or None -> (B, nkv, rep, d). Two small matmuls; SDPA's CPU flash kernel is ~9x slower for one query.

    K/V are slices of the cache, whose batch stride is its capacity rather than S, and batched matmul copies such
    operands to a contiguous buffer on every call, which dominates for long contexts: from LOOP_KEYS keys on, each
    (row, head) slab, contiguous in itself, gets its own pair of 2-D products instead."""
    b, S = q.shape[0], k.shape[2]
    if S >= LOOP_KEYS and not (k.is_contiguous() and v.is_contiguous()):
        return _one_query_per_head(q, k, v, allowed, scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, nkv, rep, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.view(b, 1, 1, S), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _one_query_per_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`one_query` as a loop over rows and kv heads: the same products on (rep, d) x (S, d) slabs."""
    b, nkv, S = q.shape[0], q.shape[1], k.shape[2]
    out = torch.empty_like(q)  # (B, nkv, rep, d)
    for i in range(b):
        blocked = None if allowed is None else ~allowed.view(b, S)[i]  # (S,)
        for h in range(nkv):
            scores = torch.mm(q[i, h], k[i, h].t()).float() * scale  # (rep, S)
            if blocked is not None:
                scores = scores.masked_fill(blocked, float("-inf"))
            out[i, h] = torch.mm(torch.softmax(scores, dim=-1).to(v.dtype), v[i, h])
    return out


def one_query_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`one_query` written for torch.compile (`--compile`): products and sums over d and S as broadcasts, which
    inductor turns into loops reading the strided cache slices once. Batched matmul instead copies every K and V
    slice of a batch to a contiguous buffer first (their batch stride is the cache's capacity, not S)."""
    b, S = q.shape[0], k.shape[2]
    scores = (q[:, :, :, None, :].float() * k[:, :, None].float()).sum(-1) * scale  # (B, nkv, rep, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.view(b, 1, 1, S), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype)  # (B, nkv, rep, d)


class AttentionMask:
    """How the keys of one forward call may be attended: either `is_causal` with no mask or an explicit
    boolean mask (B, 1, T, S), True = attend. Built once per forward by the backbone."""

    __slots__ = ("mask", "is_causal")

    def __init__(self, mask: torch.Tensor | None, is_causal: bool) -> None:
        self.mask = mask
        self.is_causal = is_causal


class SharedAttention(nn.Module):
    def __init__(self, config: Zamba2Config, slots: list[int]) -> None:
        super().__init__()
        W = config.attention_hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.scale = (self.head_dim / 2) ** -0.5
        self.dropout = config.attention_dropout
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = Linear(W, q_out, bias=False)
        self.k_proj = Linear(W, kv_out, bias=False)
        self.v_proj = Linear(W, kv_out, bias=False)
        self.o_proj = Linear(q_out, config.hidden_size, bias=False)
        self.use_adapters = config.use_shared_attention_adapter
        if self.use_adapters:
            r = config.adapter_rank
            # keyed by hybrid ordinal j; k/v adapters output nkv * d so GQA works
            self.linear_q_adapter_list = nn.ModuleDict({str(j): low_rank_adapter(W, r, q_out) for j in slots})
            self.linear_k_adapter_list = nn.ModuleDict({str(j): low_rank_adapter(W, r, kv_out) for j in slots})
            self.linear_v_adapter_list = nn.ModuleDict({str(j): low_rank_adapter(W, r, kv_out) for j in slots})

    # Switch for the split q/k/v fast path (tests turn it off to compare with the plain path).
    split_projections = True

    @property
    def can_split(self) -> bool:
        """Whether q/k/v can be applied half by half: float projections always, quantised ones when their
        codes can be cut at the middle column (int8; int4 when a group does not straddle it)."""
        W = self.q_proj.in_features
        return self.split_projections and all(
            is_plain(p) or (isinstance(p, QuantizedLinear) and p.can_take_columns(0, W // 2))
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )

    def embedding_projections(self, emb: torch.Tensor, norm_weight_e: torch.Tensor) -> EmbeddingParts:
        """q, k, v of the embedding half of the input before its per-position norm scale: W[:, H:] (w_e * e).

        The embeddings and W are the same at every hybrid layer this block serves, and the norm over
        concat(h, e) only scales them by a per-position scalar, so these are computed once per forward and
        reused: later uses stream half of the q/k/v weights (exact up to rounding)."""
        H = emb.shape[-1]
        ew = norm_weight_e * emb
        return tuple(linear_columns(p, ew, H, 2 * H) for p in (self.q_proj, self.k_proj, self.v_proj))

    def forward(
        self,
        x: torch.Tensor,
        slot: int,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: HybridCache | None,
        output_attentions: bool = False,
        emb_parts: EmbeddingParts | None = None,
        inv_rms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, W) normalised input -> (B, T, hidden), and the attention weights (B, heads, T, S) when asked.

        With `emb_parts` (see `embedding_projections`) and the norm's `inv_rms` (B, T, 1), q/k/v read only the
        hidden half of x through the weights."""
        b, T, W = x.shape
        if emb_parts is None:
            q, k, v = (use_linear(p, x, slot) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            xh = x[..., : W // 2]
            q, k, v = (
                (linear_columns(p, xh, 0, W // 2).float() + part.float() * inv_rms).to(x.dtype)
                for p, part in zip((self.q_proj, self.k_proj, self.v_proj), emb_parts, strict=True)
            )
        if self.use_adapters:
            key = str(slot)
            q = q + self.linear_q_adapter_list[key](x)
            k = k + self.linear_k_adapter_list[key](x)
            v = v + self.linear_v_adapter_list[key](x)
        q = q.view(b, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, na, T, d)
        k = k.view(b, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        v = v.view(b, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update_kv(slot, k, v)  # (B, nkv, S, d)
        dropout = self.dropout if self.training else 0.0
        if output_attentions:
            out, weights = self._eager(q, k, v, mask, dropout)
        elif T == 1 and not self.training:
            out, weights = self._one_query(q, k, v, mask), None
        else:
            out, weights = self._sdpa(q, k, v, mask, dropout), None
        out = out.transpose(1, 2).reshape(b, T, self.n_heads * self.head_dim)
        return use_linear(self.o_proj, out, slot), weights

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float
    ) -> torch.Tensor:
        """SDPA, in fp32 when its backward will run on a CPU without a fast bf16 GEMM (zamba2/ops/gemm.py; the
        bf16 backward of 32 heads x 512 tokens took 1.46 s there against 0.41 s in fp32)."""
        wide = torch.is_grad_enabled() and q.requires_grad and gemm.upcasts(q.dtype, q.device, q.shape[-2])
        with torch.autocast(q.device.type, enabled=False) if wide else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                *((q.float(), k.float(), v.float()) if wide else (q, k, v)), attn_mask=mask.mask,
                is_causal=mask.is_causal and q.shape[-2] > 1, dropout_p=dropout, scale=self.scale,
                enable_gqa=self.n_kv != self.n_heads,
            )  # fmt: skip
        return out.to(q.dtype)

    def _one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Decode: one query per row, q (B, na, 1, d), k/v (B, nkv, S, d) -> (B, na, 1, d). Query heads are
        grouped by kv head, so repeated K/V are never materialised."""
        b = q.shape[0]
        qg = q.view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # (B, nkv, rep, d)
        out = compiled.run(one_query_fused, qg, k, v, mask.mask, self.scale, eager=one_query)
        return out.view(b, self.n_heads, 1, self.head_dim)

    def _eager(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit softmax, for output_attentions."""
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # (B, na, T, S)
        T, S = scores.shape[-2:]
        allowed = mask.mask
        if allowed is None and mask.is_causal and T > 1:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return torch.matmul(weights, v), weights
