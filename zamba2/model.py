"""Zamba2 backbone and heads: Zamba2Model, Zamba2ForCausalLM, Zamba2ForSequenceClassification.

    e = embed(ids); h = e
    for each layer: mamba layer  h = h + Mamba(norm(h))
                    hybrid j     h = h + Mamba(norm(h + linear_j(Shared_{j % nmb}(h, e, slot j))))
    h = final_layernorm(h)

The module tree produces the published checkpoint names directly (see blocks.HybridLayer for how the shared
blocks appear once); zamba2/checkpoint/keys.py is the one place that maps other layouts onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zamba2.cache import CacheShapes, HybridCache
from zamba2.config import Zamba2Config
from zamba2.generation import generate, generate_iter
from zamba2.generation_config import GenerationConfig
from zamba2.layers.attention import AttentionMask
from zamba2.layers.blocks import HybridLayer, MambaLayer, SharedBlock
from zamba2.layers.linear import Linear
from zamba2.ops.loss import causal_lm_loss, fused_linear_cross_entropy
from zamba2.ops.norms import RMSNorm
from zamba2.ops.rope import rope_tables
from zamba2.outputs import (  # noqa: F401  (re-exported: transformers' names, importable from here too)
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ModelOutput,
    SequenceClassifierOutputWithPast,
)
from zamba2.packing import packed_documents
from zamba2.pretrained import Zamba2PreTrainedModel

# ---- backbone ------------------------------------------------------------------------------------


def _positions(mask: torch.Tensor | None, b: int, T: int, cache: HybridCache | None, device) -> torch.Tensor:
    """RoPE positions (B, T): counted over real tokens so a left-padded row matches the same row alone."""
    start = cache.positions[:, None] if cache is not None else torch.zeros(b, 1, dtype=torch.long, device=device)
    if mask is None:
        return start + torch.arange(T, device=device)[None]
    return start + (mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)


class Zamba2Model(Zamba2PreTrainedModel):
    def _backbone(self) -> Zamba2Model:
        return self

    def __init__(self, config: Zamba2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        nmb = config.num_mem_blocks
        n_hybrid = len(config.hybrid_layer_ids)
        blocks = [SharedBlock(config, [j for j in range(n_hybrid) if j % nmb == b]) for b in range(nmb)]
        layers: list[nn.Module] = []
        j = 0
        for idx, kind in enumerate(config.layers_block_type):
            if kind == "hybrid":
                layers.append(HybridLayer(config, idx, slot=j, block=blocks[j % nmb], owner=j < nmb))
                j += 1
            else:
                layers.append(MambaLayer(config, idx))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    # Tensor parallelism (zamba2/tensor_parallel.py) sets this: each rank caches only its own heads.
    cache_shapes: CacheShapes | None = None

    def new_cache(self, batch_size: int, max_length: int, device: torch.device | None = None) -> HybridCache:
        device = self.device if device is None else device
        return HybridCache(self.config, batch_size, max_length, self.dtype, device, self.cache_shapes)

    def _attention_mask(
        self, mask: torch.Tensor | None, T: int, cache: HybridCache | None, device, seq_idx: torch.Tensor | None
    ) -> AttentionMask:
        """Causal + padding mask; with `seq_idx` (packed rows, no cache) also block-diagonal over documents."""
        past = cache.seq_len if cache is not None else 0
        padded = (mask is not None and not bool(mask.all())) or (cache is not None and cache.has_padding)
        if not padded and seq_idx is None and (past == 0 or T == 1):
            # SDPA's is_causal aligns the triangle top-left, right only without past keys; one new token
            # sees every key.
            return AttentionMask(None, is_causal=past == 0)
        S = past + T
        if cache is not None:
            keys = cache.key_mask[:, :S]  # (B, S)
        elif mask is not None:
            keys = mask.to(torch.bool)
        else:
            keys = torch.ones(1, S, dtype=torch.bool, device=device)
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None]  # (1, S)
        allowed = (k_pos <= q_pos)[None] & keys[:, None, :]  # (B, T, S)
        if seq_idx is not None:  # S == T here: a query sees only keys of its own document
            allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
        # A padded query has no real key to look at; letting it see itself avoids a NaN row that would
        # survive the `* mask` of the next Mamba layer (NaN * 0 = NaN).
        allowed = allowed | (k_pos == q_pos)[None]
        return AttentionMask(allowed[:, None], is_causal=False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        cache_position: torch.LongTensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, H); attention_mask (B, T) or (B, past + T), 0 = padding.

        With `past_key_values` the call continues those sequences (one token or several). `cache_position` is
        accepted for API compatibility; the cache tracks its own position.

        Packed rows: `position_ids` (B, T) or (1, T) that restart at 0 inside a row mark document starts. Each
        document then gets exactly what it gets alone: the conv and SSM states restart at its first token,
        attention never looks across a document boundary, RoPE uses the given positions. This is a training and
        scoring convention: no cache is made by default, and asking for one (`use_cache=True` or
        `past_key_values`) is an error.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                vocab = self.config.vocab_size
                raise ValueError(f"input_ids hold id {bad} outside the vocabulary (vocab_size = {vocab})")
        emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        b, T, _ = emb.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask must be (batch, tokens) = ({b}, {T}) or (batch, past + tokens); "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask[:, -T:]
            if bool(mask.all()):
                mask = None
        seq_idx = None
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != T:
                raise ValueError(
                    f"position_ids must be (batch, tokens) = ({b}, {T}) or (1, {T}); got {tuple(position_ids.shape)}"
                )
            position_ids = position_ids.expand(b, T)
            seq_idx = packed_documents(position_ids, mask)  # None unless a row restarts at 0
            if seq_idx is not None and (use_cache or past_key_values is not None):
                raise ValueError(
                    "position_ids restart at 0 inside a row (packed documents), which works without a cache "
                    "only; pass use_cache=False and no past_key_values"
                )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and seq_idx is None
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(b, T)
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"past_key_values holds {cache.batch_size} sequences but the input has {b}")
        if cache is not None:
            cache.begin(mask, T)
        attn_mask = self._attention_mask(mask, T, cache, emb.device, seq_idx)
        rope = None
        if self.config.use_mem_rope:
            if position_ids is None:
                position_ids = _positions(mask, b, T, cache, emb.device)
            position_ids = position_ids.expand(b, T)
            rope = rope_tables(position_ids, self.config.attention_head_dim, self.config.rope_base, emb.dtype)

        h = emb
        checkpointing = self.gradient_checkpointing and self.training
        # Embedding-half q/k/v per shared block, shared by that block's uses in this call. Not with gradient
        # checkpointing: a recomputed layer must redo exactly what it did the first time.
        emb_parts: dict | None = None if checkpointing else {}
        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(h)
            if isinstance(layer, HybridLayer):
                args = (h, emb, mask, attn_mask, rope, cache, output_attentions, emb_parts, seq_idx)
            else:
                args = (h, mask, cache, None, seq_idx)
            if checkpointing:
                out = checkpoint(layer, *args, use_reentrant=False)
            else:
                out = layer(*args)
            if isinstance(layer, HybridLayer):
                h, weights = out
                if output_attentions:
                    all_attn.append(weights)
            else:
                h = out
        h = self.final_layernorm(h)
        if output_hidden_states:
            # embeddings, the outputs of layers 0..L-2 (each layer's input), then the normalised last output
            all_hidden.append(h)
        if cache is not None:
            cache.advance(T, mask)
        out = BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=cache if use_cache or past_key_values is not None else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


# ---- heads ---------------------------------------------------------------------------------------


def _keep_positions(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """0 = every position; k > 0 = the last k; a 1-D index tensor = those positions.

    A kept slice is copied out with fresh strides: a (1, 1, H) view of a long (1, T, H) keeps the batch stride
    T * H, which sends the lm_head matmul down a batched path that copies the (H, V) weight transposed on
    every call (430 ms instead of 9 ms at 1.2B).
    """
    if isinstance(logits_to_keep, int):
        if logits_to_keep == 0 or logits_to_keep >= h.shape[1]:
            return h
        return h[:, -logits_to_keep:].clone(memory_format=torch.contiguous_format)
    return h[:, logits_to_keep]


class Zamba2ForCausalLM(Zamba2PreTrainedModel):
    def __init__(self, config: Zamba2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Zamba2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # generate()'s defaults; from_pretrained replaces it with the checkpoint's generation_config.json.
        self.generation_config = GenerationConfig.from_model_config(config)
        self._post_init()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        loss_only: bool = False,
    ) -> CausalLMOutputWithPast | tuple:
        """The transformers arguments, plus `loss_only=True` for training loops: with `labels`, the loss comes
        from the fused lm_head + cross entropy (zamba2/ops/loss.py, which never holds the (T, vocab) logits) and
        `logits` is None. Same loss and gradients as the default path up to rounding."""
        if loss_only and labels is None:
            raise ValueError("loss_only=True needs labels: it returns the loss instead of the logits")
        base = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, True, cache_position,
        )  # fmt: skip
        if loss_only:
            logits, loss = None, fused_linear_cross_entropy(base.last_hidden_state, self.lm_head.weight, labels)
        else:
            logits = self.lm_head(_keep_positions(base.last_hidden_state, logits_to_keep))
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        out = CausalLMOutputWithPast(loss, logits, base.past_key_values, base.hidden_states, base.attentions)
        return out if return_dict else out.to_tuple()

    # Generation lives in zamba2/generation.py; these make it a method, with the full signature.
    generate = generate
    generate_iter = generate_iter


class Zamba2ForSequenceClassification(Zamba2PreTrainedModel):
    """Scores the last real token of each row: the last non-pad token when pad_token_id is set, else the last
    position (which needs batch 1, since padding cannot be told apart)."""

    def __init__(self, config: Zamba2Config) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = Zamba2Model(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)
        self._post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        cache_position: torch.LongTensor | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple:
        base = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, True, cache_position,
        )  # fmt: skip
        logits = self.score(base.last_hidden_state)  # (B, T, labels)
        b = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and b != 1:
            raise ValueError("batch size > 1 needs config.pad_token_id to find each row's last token")
        if pad is None or input_ids is None:
            last = torch.full((b,), logits.shape[1] - 1, device=logits.device)
        else:
            # index of the last non-pad token (the last position when a row has no padding on the right)
            idx = torch.arange(input_ids.shape[1], device=logits.device)
            last = (idx * (input_ids != pad).to(idx.dtype)).argmax(-1)
        pooled = logits[torch.arange(b, device=logits.device), last]  # (B, labels)
        loss = self.classification_loss(pooled, labels) if labels is not None else None
        out = SequenceClassifierOutputWithPast(loss, pooled, base.past_key_values, base.hidden_states, base.attentions)
        return out if return_dict else out.to_tuple()

    def classification_loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE for regression, CE for single-label, BCE-with-logits for multi-label; inferred when unset."""
        labels = labels.to(pooled.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        kind = self.config.problem_type
        if kind == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze().float(), labels.squeeze().float())
            return F.mse_loss(pooled.float(), labels.float())
        if kind == "single_label_classification":
            return F.cross_entropy(pooled.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled.float(), labels.float())
