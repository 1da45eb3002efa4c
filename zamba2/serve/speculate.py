"""Speculative decoding in the server, for a lone running stream (zamba2/speculative.py does the work).

Batched decode already reads the weights once for every running row; speculation pays off when one stream runs
alone, batch-1 decode being bound by the weights' memory traffic. So while exactly one request is decoding, the
engine hands its step to that request's `Speculator` (prompt lookup or a draft model, per `serve` flags), which
feeds the last token and its drafts through the batch cache (one row) in one forward and keeps what the model
accepts; as soon as a second stream joins, plain batched steps resume from the same cache. Each request keeps
its own Speculator (its adaptive draft length and back-off, and a draft model's cache, which catches up on the
tokens decoded meanwhile when the stream is alone again). The counters are the engine's, shown in /metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from zamba2.cache import HybridCache
from zamba2.serve.requests import Slot
from zamba2.speculative import (
    DEFAULT_DRAFT_TOKENS,
    DraftModel,
    PromptLookup,
    SpeculationStats,
    Speculator,
    StepResult,
)

log = logging.getLogger("zamba2.serve")


@dataclass
class SpeculationSettings:
    """`zamba2 serve --prompt-lookup K` or `--draft-model PATH [--draft-tokens K]`."""

    prompt_lookup: int | None = None  # K drafts per check from the n-gram lookup
    draft_model: Any = None  # a Zamba2ForCausalLM with the model's vocabulary
    draft_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt_lookup is None) == (self.draft_model is None):
            raise ValueError("speculation needs exactly one of prompt_lookup or draft_model")
        for name in ("prompt_lookup", "draft_tokens"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"{name} must be an int >= 1, got {k!r}")

    def speculator(self, model, stats: SpeculationStats) -> Speculator:
        if self.prompt_lookup is not None:
            return Speculator(model, PromptLookup(), self.prompt_lookup, stats)
        k = self.draft_tokens or DEFAULT_DRAFT_TOKENS
        return Speculator(model, DraftModel(self.draft_model), k, stats)


def speculative_step(seq: Slot, batch: HybridCache, speculator: Speculator) -> StepResult:
    """Feed seq's last token (and drafts) through `batch` (its only row); returns the tokens to emit with their
    raw logits. Afterwards `batch` holds seq.tokens + tokens[:-1], as after plain decode steps. Raises what the
    model or the proposer raises; the caller fails the request (the batch then holds only that request)."""
    req = seq.request
    return speculator.step(
        batch, seq.next_token, seq.tokens, req.params, seq.generator,
        max_tokens=req.max_tokens - seq.generated, eos_token_ids=sorted(seq.eos),
    )  # fmt: skip


def emit(seq: Slot, out: StepResult) -> tuple[int, bool, str | None]:
    """Record a step's tokens in seq (its Outputs go out) until it finishes: (tokens emitted, finished, failure
    message or None). Non-finite logits or a failing output end the request there."""
    finite = torch.isfinite(out.logits).all(-1).tolist()
    for i, (token, ok) in enumerate(zip(out.tokens, finite, strict=True)):
        if not ok:
            return i, False, "the model's logits are not finite (NaN or inf)"
        try:
            if seq.advance(token, out.logits[i]):
                return i + 1, True, None
        except Exception as exc:
            log.exception("request %d: output failed", seq.id)
            return i, False, f"output failed: {type(exc).__name__}: {exc}"
    return len(out.tokens), False, None
