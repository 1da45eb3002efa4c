"""Speculative decoding: propose a few tokens cheaply, check them all with one forward pass of the model.

Batch-1 decode streams every weight once per token. Here a proposer guesses up to k next tokens, and one forward
over [last token, d_1 .. d_k] (the multi-token path, one pass over the weights) gives the model's distribution at
each of the k + 1 positions. The longest acceptable prefix d_1 .. d_j is kept, plus one token of the model's own
(a correction at j + 1, or a bonus after d_k), so every verification emits 1 .. k + 1 tokens. The hybrid cache
rolls back exactly to the kept tokens (HybridCache.begin_speculation / commit, zamba2/cache.py).

Proposers:
- `PromptLookup`: the tokens that followed the most recent earlier occurrence of the last n tokens (n from
  max_matching_ngram_size down to 1) in the prompt and the text so far; no second model.
- `DraftModel`: a smaller Zamba2 with the same vocabulary, k greedy or sampled steps in its own cache, which rolls
  back the same way and is fed every token the model emitted before it proposes again.

Exactness: greedy gives exactly plain greedy's tokens (up to argmax ties between fp32 roundings of the two
paths). Sampling uses the standard rejection rule: d_i is kept with probability min(1, p(d_i) / q(d_i)), and on
rejection the token is drawn from norm(max(p - q, 0)); for prompt lookup q is one-hot, so d_i is kept with
probability p(d_i) and the replacement is drawn from p without d_i. The output distribution is then the model's.
p is the fully processed distribution of each position (penalties over the history as it stands there,
temperature, top-k / top-p / min-p, end-of-sequence held back before min_new_tokens).

`Speculator.step` is the unit both `generate` (via `generate_tokens`) and the server call: it feeds the last token
(and the drafts) and returns the tokens picked. It adapts the draft length (up on full acceptance, down on a
rejection) and backs off to plain decode steps after proposals that are rejected outright, doubling the pause
each time, so that text the proposer cannot predict decodes at close to the plain speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from zamba2.cache import HybridCache
from zamba2.generation import check_finite, decode_step, prefill
from zamba2.sampling import SamplingParams, pick_from, processed_logits

DEFAULT_NGRAM_SIZE = 2  # transformers' max_matching_ngram_size default
DEFAULT_DRAFT_TOKENS = 4
MAX_BACKOFF = 16  # plain decode steps after repeated outright rejections, at most
# What one verification of k drafts costs, in plain decode steps (zamba2.bench.speculative verify, bf16, one CPU
# core): 1.18-1.43 for k = 1..8 at the 1.2B architecture, 1.33-1.7 on the default model. A check pays off when it
# yields more tokens than this plus its proposal's cost; the speculator backs off when its checks do not.
VERIFY_COST = 1.4
YIELD_MEMORY = 0.7  # weight of the past in the running mean of tokens per check


def check_draft_vocab(name: str, model_vocab: int, draft_vocab: int) -> None:
    """A draft model proposes ids of the model's vocabulary: refuse one whose vocab_size differs (the CLI and the
    server check the configs before they load or serve anything)."""
    if draft_vocab != model_vocab:
        raise ValueError(f"--draft-model {name}: vocab_size {draft_vocab}, the model's is {model_vocab}; "
                         "the draft must share the model's tokenizer")  # fmt: skip


@dataclass
class SpeculationStats:
    """Counters a speculative generation fills in (the CLI's statistics line, the server's /metrics)."""

    proposed: int = 0  # draft tokens checked by a verification
    accepted: int = 0  # of those, kept
    verifications: int = 0  # multi-token forward passes
    plain_steps: int = 0  # one-token decode steps (no proposal, or backing off)
    tokens: int = 0  # tokens emitted by Speculator.step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Proposer(Protocol):
    def propose(
        self, history: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens after `history` (L,) and the distributions (n, V) they were drawn from, or None
        when they are certain (one-hot: prompt lookup, greedy drafts). An empty list: nothing to propose."""
        ...

    def accepted(self, n: int) -> None:
        """The model kept the first n drafts of the last proposal."""
        ...

    def cost(self, model) -> float:
        """What proposing one token costs, in decode steps of `model` (an estimate; 0 for a free proposer)."""
        ...


class PromptLookup:
    """n-gram lookup in the prompt and the text so far (transformers' prompt_lookup_num_tokens)."""

    def __init__(self, max_ngram_size: int = DEFAULT_NGRAM_SIZE) -> None:
        if isinstance(max_ngram_size, bool) or not isinstance(max_ngram_size, int) or max_ngram_size < 1:
            raise ValueError(f"max_matching_ngram_size must be an int >= 1, got {max_ngram_size!r}")
        self.max_ngram_size = max_ngram_size

    def propose(
        self, history: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        L = history.numel()
        for n in range(min(self.max_ngram_size, L - 1), 0, -1):
            # windows history[i : i + n] for i <= L - 1 - n: each has a following token and is not the suffix itself
            windows = history[: L - 1].unfold(0, n, 1)  # (L - n, n)
            hits = (windows == history[L - n :]).all(dim=-1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n  # the most recent match
                return history[start : start + k].tolist(), None
        return [], None

    def accepted(self, n: int) -> None:
        pass

    def cost(self, model) -> float:
        """What proposing one token costs, in decode steps of `model`: nothing (a search in the history)."""
        return 0.0


class DraftModel:
    """A smaller Zamba2 proposing k tokens by k steps of its own, in its own cache.

    The draft's cache holds `ids`, a prefix of the history. Each proposal first feeds it the rest (at least the
    last token; also the model's correction or bonus token, and whatever came while the speculator backed off),
    then steps k - 1 times under speculation, which `accepted(n)` commits back to the kept drafts. One DraftModel
    follows one sequence; if the history stops extending `ids`, it starts again from the prompt."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: HybridCache | None = None
        self.ids = torch.empty(0, dtype=torch.long)  # the tokens in the cache
        self._drafts: list[int] = []  # the last proposal

    def _sync(self, history: torch.Tensor) -> torch.Tensor:
        """Feed the draft what it has not seen of history (L,); return its next logits (1, V)."""
        fed = self.ids.numel()
        if self.cache is not None and self.cache.speculating:  # the last proposal was never judged (an error)
            self.cache.commit(0)
            fed = self.cache.seq_len
            self.ids = self.ids[:fed]
        if self.cache is None or fed >= history.numel() or not torch.equal(self.ids, history[:fed]):
            self.cache = self.model.model.new_cache(1, history.numel() + 256, device=history.device)
            fed = 0
        logits = prefill(self.model, history[None, fed:], None, self.cache)
        self.ids = history.clone()
        return logits

    def propose(
        self, history: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        logits = self._sync(history)
        drafts: list[int] = []
        probs = []
        for i in range(k):
            prev = torch.cat([history, history.new_tensor(drafts)])[None] if _uses_history(params) else None
            scores = processed_logits(logits, params, prev)
            if params.greedy:
                token = int(scores.argmax(-1))
            else:
                p = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p[0])
            drafts.append(token)
            if i == k - 1:
                break
            if i == 0:
                self.cache.begin_speculation()
            logits = decode_step(self.model, history.new_tensor([token]), self.cache)
        self._drafts = drafts
        return drafts, torch.stack(probs) if probs else None

    def cost(self, model) -> float:
        """One draft step in decode steps of `model`, estimated from the two configs (so that the speculator's
        choices, and a seeded sample, never depend on timing): parameters streamed, plus ~1M parameters' worth of
        fixed work per layer (kernel launches, the small ops). The default model's 3-layer draft: 0.5 (measured
        0.48); Zamba2-1.2B drafting for 7B: 0.16."""

        def size(m) -> float:
            return sum(p.numel() for p in m.parameters()) + 1e6 * m.config.num_hidden_layers

        return size(self.model) / size(model)

    def accepted(self, n: int) -> None:
        if self.cache is not None and self.cache.speculating:
            keep = min(n, len(self._drafts) - 1)  # the last draft was never fed
            self.cache.commit(keep)
            self.ids = torch.cat([self.ids, self.ids.new_tensor(self._drafts[:keep])])


@dataclass
class StepResult:
    """What one `Speculator.step` picked: `tokens` (1 .. k + 1 ids), and for each the model's raw logits and the
    processed scores it was picked from, (n, V) fp32 each (what generate's output_logits / output_scores hold)."""

    tokens: list[int]
    logits: torch.Tensor
    scores: torch.Tensor


class Speculator:
    """Speculative decoding for one batch-1 sequence: `step` feeds the last token and emits one or more tokens.

    `proposer` is a PromptLookup or a DraftModel (anything with their `propose` / `accepted`); `num_tokens` is
    the largest number of drafts per verification (the draft length adapts below it). `stats` is filled in."""

    def __init__(self, model, proposer: Proposer, num_tokens: int, stats: SpeculationStats | None = None) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"the number of speculative tokens must be an int >= 1, got {num_tokens!r}")
        self.model, self.proposer, self.max_drafts = model, proposer, num_tokens
        self.stats = stats if stats is not None else SpeculationStats()
        self.k = num_tokens  # current draft length
        self._pause = 0  # plain steps left before the next proposal
        self._backoff = 0  # the pause after the next failed check (doubles each time, up to MAX_BACKOFF)
        cost = getattr(proposer, "cost", None)  # a proposer of one's own may leave it out: free
        self._draft_cost = float(cost(model)) if cost is not None else 0.0  # decode steps per proposed token
        self._yield: float | None = None  # running mean of the tokens a check emits

    @torch.no_grad()
    def step(
        self,
        cache: HybridCache,
        last_token: int,
        history: torch.Tensor | Sequence[int],
        params: SamplingParams,
        generator: torch.Generator | None = None,
        max_tokens: int | None = None,
        eos_token_ids: Sequence[int] = (),
        no_eos_for: int = 0,
    ) -> StepResult:
        """Feed `last_token` (and any drafts) through `cache` and pick the next tokens.

        cache: batch 1, holding every token of `history` but the last; history (L,) ids: prompt and tokens so
        far, ending with last_token (the proposals and the penalties read it). At most `max_tokens` tokens come
        back (None: no limit), cut after the first of `eos_token_ids`, which the first `no_eos_for` tokens
        cannot be (min_new_tokens). Afterwards the cache holds history + tokens[:-1]: the last token returned is
        the next call's last_token, as after a plain decode step.
        """
        if cache.batch_size != 1:
            raise ValueError(f"speculative decoding supports batch size 1, the cache holds {cache.batch_size} rows")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        device = cache.device
        history = torch.as_tensor(history, dtype=torch.long, device=device).reshape(-1)
        if history.numel() == 0 or int(history[-1]) != int(last_token):
            raise ValueError("history must end with last_token")
        limit = max_tokens if max_tokens is not None else self.max_drafts + 1
        drafts, q = [], None
        if self._pause:
            self._pause -= 1
        elif limit > 1:
            drafts, q = self.proposer.propose(history, min(self.k, limit - 1), params, generator)
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        if not drafts:
            raw = decode_step(self.model, history[-1:], cache).float()  # (1, V)
            scores = position_scores(raw, params, history, [], eos, no_eos_for)
            token = int(pick_from(scores, params, generator)[0])
            self.stats.plain_steps += 1
            self.stats.tokens += 1
            return StepResult([token], raw, scores)

        ids = torch.tensor([[int(last_token), *drafts]], device=device)  # (1, k + 1)
        cache.begin_speculation()
        try:
            raw = self.model(ids, past_key_values=cache, logits_to_keep=0).logits[0].float()  # (k + 1, V)
        except BaseException:
            cache.commit(0)
            raise
        scores = position_scores(raw, params, history, drafts, eos, no_eos_for)
        j, token = accept(scores, drafts, q, params, generator)
        tokens = drafts[:j] + [token]
        if len(eos):
            ended = torch.isin(torch.tensor(tokens, device=device), eos).nonzero()
            if ended.numel():
                tokens = tokens[: int(ended[0]) + 1]
        cache.commit(len(tokens))  # last_token and tokens[:-1]
        self.proposer.accepted(len(tokens) - 1)
        self._adapt(j, len(drafts), len(tokens))
        s = self.stats
        s.verifications += 1
        s.proposed += len(drafts)
        s.accepted += j
        s.tokens += len(tokens)
        return StepResult(tokens, raw[: len(tokens)], scores[: len(tokens)])

    def _adapt(self, accepted: int, proposed: int, emitted: int) -> None:
        """Longer drafts after a full acceptance, shorter after a rejection. A check fails when it is rejected
        outright, or, for a proposer that costs something (a draft model), when checks have been yielding fewer
        tokens than they cost (VERIFY_COST plus the proposal, in decode steps; a free proposer's check that keeps
        one draft already yields 2 > VERIFY_COST). After a failed check comes a pause of plain steps, doubling
        while checks keep failing (1, 2, 4 .. MAX_BACKOFF), then a probe. Every input is a token count or a
        config, so the choices are deterministic (a seeded sample is reproducible)."""
        if accepted == proposed:
            self.k = min(self.max_drafts, self.k + 1)
        else:
            self.k = max(1, self.k - 1)
        y = emitted if self._yield is None else YIELD_MEMORY * self._yield + (1 - YIELD_MEMORY) * emitted
        self._yield = y
        costly = self._draft_cost > 0 and y < VERIFY_COST + self._draft_cost * proposed
        if accepted == 0 or costly:
            self._backoff = min(MAX_BACKOFF, max(1, 2 * self._backoff))
            self._pause = self._backoff
        else:
            self._backoff = 0


def _uses_history(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0


def position_scores(
    raw: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor,
    drafts: Sequence[int],
    eos: torch.Tensor,
    no_eos_for: int,
) -> torch.Tensor:
    """Processed scores (m, V) for the m = len(drafts) + 1 positions of a verification: position i follows
    history + drafts[:i], so the penalties read exactly that, and end-of-sequence is held back at positions
    i < no_eos_for. Rows stand for separate positions, so one call serves them all (row i masks its history)."""
    m = raw.shape[0]
    logits = raw
    if len(eos) and no_eos_for > 0:
        logits = logits.clone()
        rows = torch.arange(min(m, no_eos_for), device=raw.device)
        logits[rows[:, None], eos[None]] = float("-inf")
    prev = mask = None
    if _uses_history(params):
        L = history.numel()
        prev = torch.cat([history, history.new_tensor(list(drafts))]).expand(m, -1)  # (m, L + m - 1)
        mask = torch.arange(prev.shape[1], device=raw.device)[None] < L + torch.arange(m, device=raw.device)[:, None]
    return processed_logits(logits, params, prev, mask)


def accept(
    scores: torch.Tensor,
    drafts: Sequence[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """The verification rule. scores (k + 1, V) processed, drafts (k ids), q (k, V) the draft distributions or
    None (one-hot). Returns j, the number of drafts kept, and the token that follows them: the correction drawn
    at position j, or the bonus token of position k when all are kept."""
    k = len(drafts)
    d = torch.tensor(list(drafts), device=scores.device)
    if params.greedy:
        best = scores.argmax(dim=-1)  # (k + 1,)
        wrong = (best[:k] != d).nonzero()
        j = int(wrong[0]) if wrong.numel() else k
        return j, int(best[j])
    p = torch.softmax(scores, dim=-1)  # (k + 1, V)
    rows = torch.arange(k, device=scores.device)
    ratio = p[rows, d] if q is None else p[rows, d] / q[rows, d]  # keep d_i with probability min(1, ratio)
    u = torch.rand(k, generator=generator, device=scores.device)
    rejected = (u >= ratio).nonzero()
    if not rejected.numel():
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    j = int(rejected[0])
    if q is None:
        residual = p[j].index_fill(0, d[j : j + 1], 0.0)  # p without the rejected draft
    else:
        residual = (p[j] - q[j]).clamp_(min=0)
    if not bool(residual.sum() > 0):  # p == q (within rounding) gives no rejection in exact arithmetic
        residual = p[j]
    return j, int(torch.multinomial(residual, 1, generator=generator))


def generate_tokens(
    speculator: Speculator,
    cache: HybridCache,
    logits: torch.Tensor,
    history: torch.Tensor,
    prompt_len: int,
    max_new_tokens: int,
    min_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    eos: Sequence[int],
    stopped: Callable[[int], bool] | None,
    scores: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> Iterator[torch.Tensor]:
    """generate_iter's loop with speculation (batch 1): yields each new token as a (1,) tensor.

    `logits` (1, V) are the prompt's last; `history` (1, prompt_len + max_new_tokens) holds the prompt and receives
    the new tokens; `stopped(pos)` says whether a stop string ends at history position pos."""
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=history.device)
    row = history[0]
    first_scores = position_scores(logits.float(), params, row[:prompt_len], [], eos_t, min_new_tokens)
    step = StepResult([int(pick_from(first_scores, params, generator)[0])], logits.float(), first_scores)
    n = 0
    while True:
        check_finite(step.logits, n)  # every position the step picked from, one check
        for i, token in enumerate(step.tokens):
            pos = prompt_len + n
            row[pos] = token
            if scores is not None:
                scores.append((step.logits[i : i + 1], step.scores[i : i + 1]))
            n += 1
            yield row[pos : pos + 1].clone()
            if token in eos or n == max_new_tokens or (stopped is not None and stopped(pos)):
                return
        step = speculator.step(
            cache, step.tokens[-1], row[: prompt_len + n], params, generator, max_tokens=max_new_tokens - n,
            eos_token_ids=eos, no_eos_for=max(0, min_new_tokens - n),
        )  # fmt: skip
