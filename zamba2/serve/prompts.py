"""The engine's prompt stage: admission, prefill in pieces (scored prompts too), and joining the batch.

A mixin of `Engine` (zamba2/serve/engine.py, whose docstring tells the stages): these methods run on the engine
thread and work on its lists (`_prefilling`, `_ready`, `_running`) and its batch cache.
"""

from __future__ import annotations

import logging

import torch

from zamba2.cache import HybridCache
from zamba2.eval.scoring import piece_size, score_chunk
from zamba2.serve import batch as batching
from zamba2.serve.requests import Progress, Slot, TokenLogprob, fair_shares, pick

log = logging.getLogger("zamba2.serve")

# Decode-time K/V headroom reserved when a batch is rebuilt; beyond it the cache grows by doubling.
KV_HEADROOM = 512


class PromptStage:
    """Engine methods from a request's admission to its first token (the engine sets every attribute used)."""

    def _admit(self, seq: Slot) -> None:
        try:
            # A scored prompt runs through the model whole: a snapshot would skip the tokens it must score.
            reuse = self.prompt_cache is not None and seq.request.prompt_logprobs is None
            snap = self.prompt_cache.lookup(seq.tokens) if reuse else None
            if snap is not None and len(snap.tokens) == seq.prompt_len:  # the whole prompt: no prefill
                seq.cache, seq.ready_logits = snap.cache, snap.logits  # read only: joining copies it
                seq.prefilled = seq.cached_tokens = seq.prompt_len
                self._ready.append(seq)
                return
            if snap is not None:
                seq.cache = batching.resume(snap.cache, seq.prompt_len)
                seq.prefilled = seq.cached_tokens = len(snap.tokens)
            else:
                seq.cache = HybridCache(self.config, 1, seq.prompt_len, dtype=self.dtype, device=self.device)
        except Exception as exc:
            log.exception("request %d: admission failed", seq.id)
            self._fail(seq, f"admission failed: {type(exc).__name__}: {exc}")
            return
        self._prefilling.append(seq)

    def _prefill_step(self) -> None:
        plain = [s for s in self._prefilling if s.request.prompt_logprobs is None]
        work = list(zip(plain, fair_shares([s.remaining_prompt for s in plain], self.prefill_chunk), strict=True))
        scored = [s for s in self._prefilling if s.request.prompt_logprobs is not None]
        if scored:
            # Scored prompts take turns (oldest first), one whole piece of `score_tokens`' size per iteration:
            # the piece boundaries, hence the bf16 rounding of every logprob, never depend on the server's load,
            # and `zamba2 eval` without --server gets the same figures to the last bit.
            seq = scored[0]
            piece = piece_size(seq.prompt_len)
            work.append((seq, min(piece - seq.prefilled % piece, seq.remaining_prompt)))
        for seq, n in sorted(work, key=lambda x: x[0].remaining_prompt):
            if n == 0:
                continue
            try:
                ids = torch.tensor([seq.tokens[seq.prefilled : seq.prefilled + n]], device=self.device)
                if seq.request.prompt_logprobs is None:
                    logits = self.model(ids, past_key_values=seq.cache, logits_to_keep=1).logits[:, -1]  # (1, V)
                else:
                    logits = self._score_prompt(seq, ids)
                seq.prefilled += n
                self.stats.prompt_tokens += n
                if seq.prefilled < seq.prompt_len:
                    seq.emit(Progress(seq.prefilled, seq.prompt_len))
                    continue
                seq.cache, seq.ready_logits = batching.trimmed(seq.cache), logits[0]
                if self.prompt_cache is not None:  # sized to the prompt: stored as is, never written again
                    self.prompt_cache.put(seq.tokens, seq.cache, logits=seq.ready_logits)
            except Exception as exc:
                log.exception("request %d: prefill failed", seq.id)
                self._prefilling.remove(seq)
                self._fail(seq, f"prefill failed: {type(exc).__name__}: {exc}")
                continue
            self._prefilling.remove(seq)
            self._ready.append(seq)

    def _score_prompt(self, seq: Slot, ids: torch.Tensor) -> torch.Tensor:
        """Prefill one chunk of a scored prompt, keeping its tokens' logprobs; returns the last logits (1, V)."""
        start, k = seq.prefilled, seq.request.prompt_logprobs or 0
        targets = torch.tensor(seq.tokens[start + 1 : min(start + ids.shape[1] + 1, seq.prompt_len)])
        scores = score_chunk(self.model, ids, seq.cache, targets, top=k)
        best = zip(scores.top_ids.tolist(), scores.top_logprobs.tolist(), strict=True) if k else None
        assert seq.prompt_scores is not None and scores.last_logits is not None
        for token, lp in zip(targets.tolist(), scores.logprobs.tolist(), strict=True):
            top = list(zip(*next(best), strict=True)) if best is not None else []
            seq.prompt_scores.append(TokenLogprob(token, lp, 0, top))
        return scores.last_logits

    def _join_ready(self) -> None:
        """Sample the first token of each finished prompt; the ones that go on join the batch."""
        ready, self._ready = self._ready, []
        joined: list[Slot] = []
        for seq in ready:
            assert seq.ready_logits is not None
            if seq.request.max_tokens == 0:  # the prompt's scores were all that was asked for
                seq.prompt_only()
                self._finish(seq)
                continue
            error, done = self._first_token(seq, seq.ready_logits)
            if error is not None:
                self._fail(seq, error)
            elif done:
                self._finish(seq)
            else:
                joined.append(seq)
        if not joined:
            return
        seqs = self._running + joined
        longest = max([s.cache.seq_len for s in joined] + [self._batch.seq_len if self._batch else 0])
        left = max(s.request.max_tokens - s.generated for s in seqs)
        try:
            if self._state_rows is None:
                self._state_rows = batching.StateRows(self.config, self.max_concurrency, self.dtype, self.device)
            # No row outgrows max_model_len, nor does the batch (its length is its longest row's): capped there,
            # the cache never doubles, and its K/V stay within max_concurrency x max_model_len columns.
            capacity = min(longest + min(left, KV_HEADROOM), self.max_model_len)
            self._batch = batching.insert_rows(self._batch, [s.cache for s in joined], capacity=capacity,
                                               pool=self._state_rows)  # fmt: skip
        except Exception as exc:  # the running batch is unchanged: only the joining requests fail
            log.exception("joining %d requests to the batch failed", len(joined))
            for seq in joined:
                self._fail(seq, f"joining the batch failed: {type(exc).__name__}: {exc}")
            return
        for seq in joined:
            seq.cache = seq.ready_logits = None
        self._running = seqs

    def _first_token(self, seq: Slot, logits: torch.Tensor) -> tuple[str | None, bool]:
        """Sample and record the first token from the prompt's last logits (V,): (error message, finished)."""
        if not bool(torch.isfinite(logits).all()):
            return "the model's logits are not finite (NaN or inf) at the end of the prompt", False
        picked = pick([seq], logits[None])[0]
        if isinstance(picked, Exception):
            return f"sampling failed: {type(picked).__name__}: {picked}", False
        try:
            done = seq.advance(picked, logits)
        except Exception as exc:
            log.exception("request %d: output failed", seq.id)
            return f"output failed: {type(exc).__name__}: {exc}", False
        self.stats.generated_tokens += 1
        return None, done
