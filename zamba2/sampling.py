"""Next-token selection: small pure functions on a batch of logits.

Everything here takes `logits` of shape (B, V) and returns a new tensor; nothing knows about the model,
the cache or the tokenizer. `sample_next` strings the pieces together in a fixed order:

    penalties (repetition, presence/frequency)  ->  greedy argmax
                                                 or temperature -> top-k -> top-p -> min-p -> multinomial

One `SamplingParams` applies to the whole batch; a caller that wants per-row settings calls
`sample_next` once per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SamplingParams",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "logprobs",
    "min_p_filter",
    "processed_logits",
    "sample_next",
    "token_counts",
    "top_k_filter",
    "top_logprobs",
    "top_p_filter",
]


@dataclass
class SamplingParams:
    """How to pick the next token. The defaults are plain greedy decoding.

    `temperature == 0` also means greedy, whatever `do_sample` says. `top_k == 0`, `top_p == 1`,
    `min_p == 0`, `repetition_penalty == 1` and zero presence/frequency penalties switch those steps off.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first out-of-range field; return self so calls can chain."""
        # Written as `not (in range)` so that NaN fails every check.
        if not (self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2 <= value <= 2):
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {value}")
        return self


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {tuple(logits.shape)}")


def _check_prev(prev_ids: Tensor, mask: Tensor | None, batch: int) -> None:
    if prev_ids.dim() != 2 or prev_ids.shape[0] != batch:
        raise ValueError(f"prev_ids must have shape ({batch}, T), got {tuple(prev_ids.shape)}")
    if mask is not None and mask.shape != prev_ids.shape:
        raise ValueError(
            f"prev_mask must match prev_ids shape {tuple(prev_ids.shape)}, got {tuple(mask.shape)}"
        )


def token_counts(prev_ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """How often each token id occurs per row: (B, T) ids -> (B, V) int64 counts.

    `mask` (B, T) bool marks the positions that count; the others (padding) may hold any id, even an
    out-of-range one such as -100.
    """
    _check_prev(prev_ids, mask, prev_ids.shape[0])
    counts = torch.zeros(prev_ids.shape[0], vocab_size, dtype=torch.long, device=prev_ids.device)
    if mask is None:
        return counts.scatter_add_(1, prev_ids, torch.ones_like(prev_ids))
    # Masked-out positions point at id 0 with weight 0, so their (possibly invalid) ids never index.
    safe_ids = torch.where(mask, prev_ids, torch.zeros_like(prev_ids))
    return counts.scatter_add_(1, safe_ids, mask.to(torch.long))


def apply_repetition_penalty(
    logits: Tensor, prev_ids: Tensor, penalty: float, mask: Tensor | None = None
) -> Tensor:
    """CTRL repetition penalty: for ids already seen, positive logits / penalty, negative ones * penalty."""
    _check_logits(logits)
    if penalty == 1.0:
        return logits
    _check_prev(prev_ids, mask, logits.shape[0])
    seen = token_counts(prev_ids, logits.shape[-1], mask) > 0  # (B, V)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: Tensor, counts: Tensor, presence: float, frequency: float
) -> Tensor:
    """OpenAI-style penalties: logits - presence * [count > 0] - frequency * count, counts (B, V)."""
    _check_logits(logits)
    if counts.shape != logits.shape:
        raise ValueError(f"counts must match logits shape {tuple(logits.shape)}, got {tuple(counts.shape)}")
    if presence == 0 and frequency == 0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits per row (ties broken towards the lower id); the rest -> -inf."""
    _check_logits(logits)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # The k-th largest value from topk (a full sort of the vocabulary cost 2.5 ms a row at 32k, 15% of a decode
    # step of the default model), then every logit above it, and of those equal to it the lowest ids until k:
    # the choice among ties is deterministic everywhere (what a stable descending sort would keep).
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(-1, keepdim=True)  # (B, 1) ties to keep
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches p.

    The most likely token is always kept. Ties are ordered by id, so the result is deterministic.
    """
    _check_logits(logits)
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # (B, V)
    # Mass strictly before each position: a token stays while the tokens ahead of it fall short of p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    _check_logits(logits)
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def logprobs(logits: Tensor) -> Tensor:
    """log_softmax over the vocabulary, computed in fp32 whatever the input dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (log-probability, token id) pairs per row, each (B, k), best first."""
    if k < 1:
        raise ValueError(f"top_logprobs k must be >= 1, got {k}")
    result = torch.topk(logprobs(logits), min(k, logits.shape[-1]), dim=-1)
    return result.values, result.indices


def processed_logits(
    logits: Tensor, params: SamplingParams, prev_ids: Tensor | None = None, prev_mask: Tensor | None = None
) -> Tensor:
    """The fp32 scores (B, V) the next token is picked from: penalties, then (when sampling) temperature and the
    top-k / top-p / min-p filters (-inf where filtered). What transformers returns as `scores`, up to a constant
    per row when sampling (the best logit is moved to 0 before the temperature, see below)."""
    _check_logits(logits)
    params.validate()
    logits = logits.float()  # penalties and softmax in fp32: bf16 would merge nearby logits
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty, prev_mask)
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            counts = token_counts(prev_ids, logits.shape[-1], prev_mask)
            logits = apply_presence_frequency_penalty(
                logits, counts, params.presence_penalty, params.frequency_penalty
            )
    if params.greedy:
        return logits
    # Scale the distances from each row's best logit, not the logits: with a tiny temperature (1e-40 is a
    # valid one) logits / T overflows to inf and softmax gives NaN, while (l - max) / T is 0 for the best
    # token and at worst -inf for the others. A penalty of ~0 can push a seen logit to +inf: clamp it finite
    # first so that the row maximum minus itself is 0, not NaN. The temperature is kept >= the smallest normal
    # fp32 number so that no denormal flushed to zero divides 0 by 0.
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = logits / max(params.temperature, torch.finfo(logits.dtype).tiny)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample_next(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prev_ids: Tensor | None = None,
    prev_mask: Tensor | None = None,
) -> Tensor:
    """Pick one token per row from logits (B, V); returns (B,) int64.

    `prev_ids` (B, T) are the ids the penalties look at (prompt and/or generated so far) and
    `prev_mask` (B, T) bool marks which of them count (False for padding). Sampling draws from
    `generator` so a seeded generator reproduces the same tokens.
    """
    return pick_from(processed_logits(logits, params, prev_ids, prev_mask), params, generator)


def pick_from(scores: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of already processed scores (B, V) (see `processed_logits`): the argmax when greedy,
    else a draw from their softmax; (B,) int64."""
    if params.greedy:
        return scores.argmax(dim=-1)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(-1)
