"""The three kinds of layer: a Mamba layer, the shared transformer block, and the hybrid layer that uses one.

The shared block has no residual connections inside; its output goes through the hybrid layer's own `linear`
and is added to the Mamba layer's input before that layer's norm (the residual stays the plain hidden state).
"""

from __future__ import annotations

import torch
from torch import nn

from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.layers.attention import AttentionMask, EmbeddingParts, SharedAttention
from zamba2.layers.linear import Linear
from zamba2.layers.mamba2 import Mamba2Mixer
from zamba2.layers.mlp import SharedMLP
from zamba2.ops.norms import RMSNorm


class MambaLayer(nn.Module):
    """h + Mamba(RMSNorm(h + extra)); `extra` is the shared block's contribution in a hybrid layer."""

    def __init__(self, config: Zamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = Mamba2Mixer(config, layer_idx)

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None,
        cache: HybridCache | None,
        extra: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """seq_idx (B, T): document index of packed rows, or None (see Mamba2Mixer.forward)."""
        x = self.input_layernorm(h if extra is None else h + extra)
        return h + self.mamba(x, mask, cache, seq_idx)


class SharedBlock(nn.Module):
    """Attention + gated MLP over concat(hidden, embeddings). Built once per num_mem_blocks and reused."""

    def __init__(self, config: Zamba2Config, slots: list[int]) -> None:
        super().__init__()
        self.slots = slots  # hybrid ordinals this block serves: j with j % num_mem_blocks == its index
        self.input_layernorm = RMSNorm(config.attention_hidden_size, eps=config.rms_norm_eps)
        self.self_attn = SharedAttention(config, slots)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = SharedMLP(config, slots)

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        slot: int,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: HybridCache | None,
        output_attentions: bool = False,
        emb_parts: dict[SharedBlock, EmbeddingParts] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`emb_parts` is one dict per forward call, filled on this block's first use (see
        SharedAttention.embedding_projections); None computes q/k/v from the whole input."""
        cat = torch.cat([h, emb], dim=-1)  # (B, T, 2H)
        inv_rms = self.input_layernorm.inv_rms(cat)
        x = self.input_layernorm(cat, inv_rms)
        parts = None
        # Only a block used more than once per forward gains from the split: with one use it computes the same
        # products in two halves, and in training the two weight-slice gradients cost a zero-filled copy each.
        if emb_parts is not None and len(self.slots) > 1 and self.self_attn.can_split:
            parts = emb_parts.get(self)
            if parts is None:
                w_e = self.input_layernorm.weight[h.shape[-1] :]
                parts = emb_parts[self] = self.self_attn.embedding_projections(emb, w_e)
        a, weights = self.self_attn(x, slot, mask, rope, cache, output_attentions, parts, inv_rms)
        return self.feed_forward(self.pre_ff_layernorm(a), slot), weights


class HybridLayer(nn.Module):
    """Shared block (slot j) -> this layer's `linear` -> added into this layer's Mamba input."""

    def __init__(self, config: Zamba2Config, layer_idx: int, slot: int, block: SharedBlock, owner: bool) -> None:
        super().__init__()
        self.slot = slot
        self.linear = Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mamba_decoder = MambaLayer(config, layer_idx)
        if owner:
            self.shared_transformer = block
        else:
            # Referenced, not registered: the block's parameters then appear once in state_dict(), under the
            # first hybrid layer that uses it, exactly as published checkpoints store them.
            self.__dict__["shared_transformer"] = block

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        mask: torch.Tensor | None,
        attn_mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: HybridCache | None,
        output_attentions: bool = False,
        emb_parts: dict | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attn_mask` already keeps packed documents apart; `seq_idx` does the same for the Mamba layer."""
        t, weights = self.shared_transformer(h, emb, self.slot, attn_mask, rope, cache, output_attentions, emb_parts)
        return self.mamba_decoder(h, mask, cache, extra=self.linear(t), seq_idx=seq_idx), weights
