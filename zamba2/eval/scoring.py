"""The log-probability a causal LM gives each token of a sequence: the one scoring function.

`score_chunk` runs one piece of a sequence through the backbone into a cache (a prefill piece) and turns the
piece's hidden states into per-token log-probabilities: the lm_head and an fp32 log-softmax over the
vocabulary, `LOGIT_ROWS` positions at a time, so a long piece never holds (T, vocab) logits at once. The
server's echo path calls it for each prefill chunk of a prompt, `score_tokens` calls it for each piece of a
whole sequence (`zamba2 eval`, the tests), so every figure comes from the same arithmetic.

Position i of a piece predicts the token after it: `targets[i]` is that token, the piece's own next id or,
for the last position, the first id of the next piece. The last piece of a sequence has one target fewer
than positions; its last logits are what generation samples the next token from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zamba2.cache import HybridCache
from zamba2.generation import LONG_PROMPT, LONG_PROMPT_CHUNK, PREFILL_CHUNK

# Positions per lm_head + log-softmax call: (128, 32000) fp32 logits are 16 MB.
LOGIT_ROWS = 128


@dataclass
class Scores:
    """Log-probabilities of the targets of some positions, fp32, on the model's device."""

    logprobs: torch.Tensor  # (m,): log p(targets[i] | everything up to position i)
    top_ids: torch.Tensor | None  # (m, k) the k most likely ids at each position, best first; None for k = 0
    top_logprobs: torch.Tensor | None  # (m, k) their log-probabilities
    last_logits: torch.Tensor | None  # (1, V) the last position's logits, in the model's dtype (score_chunk only)


def _empty(m: int, top: int, device: torch.device) -> Scores:
    lp = torch.empty(m, dtype=torch.float32, device=device)
    ids = torch.empty(m, top, dtype=torch.long, device=device) if top else None
    values = torch.empty(m, top, dtype=torch.float32, device=device) if top else None
    return Scores(lp, ids, values, None)


@torch.inference_mode()
def score_chunk(model, input_ids: torch.Tensor, cache: HybridCache, targets: torch.Tensor, top: int = 0) -> Scores:
    """Prefill `input_ids` (1, n) into `cache` (which holds the tokens before them) and score `targets` (m,),
    m = n (a piece followed by more) or n - 1 (the last piece): targets[i] is the token after position i.

    `top` > 0 also returns the `top` most likely ids at each scored position. `last_logits` are the last
    position's logits computed exactly as `model(ids, logits_to_keep=1)` does, so a request that is scored
    samples the same next token as one that is not."""
    n, m = input_ids.shape[1], targets.numel()
    if input_ids.shape[0] != 1 or m not in (n - 1, n):
        raise ValueError(f"score_chunk takes (1, n) ids and n or n - 1 targets; got {tuple(input_ids.shape)}, {m}")
    hidden = model.model(input_ids, past_key_values=cache).last_hidden_state[0]  # (n, H)
    out = _empty(m, top, hidden.device)
    targets = targets.to(hidden.device)
    for s in range(0, m, LOGIT_ROWS):
        e = min(s + LOGIT_ROWS, m)
        # fp32 before the softmax: bf16 logits would lose ~3 digits of every log-probability
        rows = torch.log_softmax(model.lm_head(hidden[None, s:e]).float()[0], dim=-1)  # (r, V)
        out.logprobs[s:e] = rows.gather(1, targets[s:e, None])[:, 0]
        if top:
            best = torch.topk(rows, min(top, rows.shape[-1]), dim=-1)
            out.top_logprobs[s:e], out.top_ids[s:e] = best.values, best.indices  # type: ignore[index]
    # the lm_head on a fresh (1, 1, H) row, as logits_to_keep=1 gives it (see model._keep_positions)
    out.last_logits = model.lm_head(hidden[None, -1:].clone())[:, -1]  # (1, V)
    return out


def piece_size(length: int) -> int:
    """Tokens per prefill piece for a sequence of `length` tokens: generation's rule (bounded activations)."""
    return LONG_PROMPT_CHUNK if length > LONG_PROMPT else PREFILL_CHUNK


@torch.inference_mode()
def score_tokens(model, ids: Sequence[int] | torch.Tensor, top: int = 0, piece: int | None = None) -> Scores:
    """Log-probabilities of ids[1:], each given the ids before it, from one prefill of the whole sequence.

    Returns (T - 1,) logprobs (and (T - 1, top) best ids / logprobs when `top` > 0), fp32. The sequence is
    scored exactly as given: nothing is prepended (a bos token, if wanted, is the caller's first id)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    T = ids.numel()
    if T < 2:
        raise ValueError(f"scoring needs at least 2 tokens (the first one is only context), got {T}")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got ids from {int(ids.min())} to {int(ids.max())}")
    device = model.device
    ids = ids.to(device)
    cache = HybridCache(model.config, 1, T, dtype=model.dtype, device=device)
    piece = piece or piece_size(T)
    out = _empty(T - 1, top, device)
    for s in range(0, T, piece):
        e = min(s + piece, T)
        part = score_chunk(model, ids[None, s:e], cache, ids[s + 1 : e + 1], top)
        out.logprobs[s : s + part.logprobs.numel()] = part.logprobs
        if top:
            out.top_ids[s : s + part.logprobs.numel()] = part.top_ids  # type: ignore[index]
            out.top_logprobs[s : s + part.logprobs.numel()] = part.top_logprobs  # type: ignore[index]
    return out
