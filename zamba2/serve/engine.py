"""The serving engine: continuous batching over one HybridCache, in a thread that owns the model.

Requests go through three stages:

    waiting     submitted, beyond --max-concurrency; a bounded queue (submit raises QueueFull past it)
    prefilling  the prompt runs through the model into the request's own batch-1 cache, at most
                `prefill_chunk` tokens per engine iteration in total, shared fairly between the prompts
                being prefilled (`fair_shares`), so a short prompt behind a long one starts within a few
                chunk-times; starts from a prompt-cache snapshot when one matches (a whole-prompt match with
                saved logits skips the prefill). A scored prompt (echo) runs whole from its first token, in
                `score_tokens`' fixed pieces, one scored prompt at a time, so its figures never depend on load
    running     a row of the shared batch cache; every iteration one decode step feeds each row its last
                token: model(tokens[:, None], past_key_values=batch, logits_to_keep=1)

A finished prefill samples the first token from its last logits, then joins the batch (batch.insert_rows:
conv/SSM states copied into the next of the engine's preallocated state rows, K/V right-aligned). Finished or
cancelled rows leave at once (batch.drop_rows, which also compacts leading padding). Each request has its own
sampling parameters, torch.Generator and penalty history; greedy rows without penalties are picked with one
argmax.

Results go back through a `sink` callable given at submit, called on the engine thread with Progress (a
prefill chunk done), Output (new tokens/text; the last one has finish_reason) or Failure events (requests.py).

Failures are contained: whatever goes wrong for one request (its prefill, non-finite logits, sampling, text
decoding, stop handling) ends that request alone with a Failure and frees its slot; the other rows of the batch
go on with the same numbers. Only a failure of the batched decode step itself, which cannot be pinned on a row,
fails every running request. At the end of each step the engine checks that every outstanding request is in
one of its lists (`untracked` counts the ones that are not: a leaked slot) and `health()` reports it, with how
long the current step has run, so that a wedge is visible in /health and /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zamba2.cache import HybridCache
from zamba2.serve import batch as batching
from zamba2.serve.prompt_cache import PromptCache
from zamba2.serve.prompts import PromptStage
from zamba2.serve.requests import (  # noqa: F401  (re-exported: the engine's public types)
    MAX_TOP_LOGPROBS,
    Event,
    Failure,
    GenerationRequest,
    Output,
    Progress,
    Sink,
    Slot,
    TokenLogprob,
    fair_shares,
    pick,
)
from zamba2.serve.speculate import SpeculationSettings, emit, speculative_step
from zamba2.speculative import SpeculationStats
from zamba2.tokenizer import Tokenizer

log = logging.getLogger("zamba2.serve")

PREFILL_CHUNK = 256
SHUTTING_DOWN = "server shutting down"


class QueueFull(RuntimeError):
    """More requests than --max-concurrency + --max-queue are outstanding."""


class ShuttingDown(RuntimeError):
    """The engine takes no new requests (the server is stopping)."""


@dataclass
class EngineStats:
    """Counters read by /metrics from other threads (plain numbers: reads are atomic enough)."""

    prompt_tokens: int = 0  # prefilled through the model (cache hits excluded)
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_tokens_per_s: float = 0.0  # over the latest decode steps
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0  # ended by an error (shutdown excluded)


class Engine(PromptStage):
    """Continuous batching for a Zamba2ForCausalLM. `start()` runs it in its own thread; tests may call
    `step()` directly instead."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer | None = None,
        *,
        max_concurrency: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        prompt_cache_bytes: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        max_model_len: int | None = None,
        speculation: SpeculationSettings | None = None,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(
                f"need max_concurrency >= 1, max_queue >= 0, prefill_chunk >= 1; "
                f"got {max_concurrency}, {max_queue}, {prefill_chunk}"
            )
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.device, self.dtype = model.device, model.dtype
        self.max_concurrency, self.max_queue, self.prefill_chunk = max_concurrency, max_queue, prefill_chunk
        # prompt + max_tokens of one request: bounds each request's K/V (see the README's memory bound)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if eos_token_ids is None:
            eos = self.config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos_token_ids.append(tokenizer.eos_token_id)
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.stats = EngineStats()
        # A lone running stream decodes speculatively when set (serve/speculate.py); counters for /metrics.
        self.speculation = speculation
        self.speculation_stats = SpeculationStats()

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[Slot] = deque()  # guarded by _lock
        self._cancel: set[int] = set()  # guarded by _lock
        self._outstanding = 0  # submitted and not finished; guarded by _lock
        self._next_id = 0
        self._stopping = False
        self._closed = False  # no new requests (shutdown has begun)
        self._abort = False  # fail everything outstanding at the next step
        self._thread: threading.Thread | None = None
        # Watchdog (read by health() from other threads): when the running step began (0: none), when the
        # engine last made progress, and outstanding requests found in none of the lists after a step.
        self._step_started = 0.0
        self._progress_at = time.monotonic()
        self.untracked = 0
        # Owned by the engine thread.
        self._waiting: deque[Slot] = deque()
        self._prefilling: list[Slot] = []
        self._ready: list[Slot] = []  # prompt done (prefilled or a whole cache hit): first token at this step
        self._running: list[Slot] = []  # row i of self._batch
        self._batch: HybridCache | None = None
        self._state_rows: batching.StateRows | None = None  # the batch's conv/SSM states, allocated at first join

    # ---- called from any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request; returns its id. Raises ValueError for a request it cannot serve, QueueFull past
        max_concurrency + max_queue outstanding, ShuttingDown after close()."""
        if not request.prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {vocab})")
        least = 0 if request.prompt_logprobs is not None else 1  # a scored prompt needs no new token
        if request.max_tokens < least:
            raise ValueError(f"max_tokens must be >= {least}, got {request.max_tokens}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) = {total} "
                f"tokens is more than the context of {self.max_model_len} tokens"
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        request.params.validate()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._outstanding >= self.max_concurrency + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self._outstanding} requests outstanding")
            if self._outstanding == 0:
                self._progress_at = time.monotonic()  # an idle engine has not been stalling
            self._outstanding += 1
            rid = self._next_id
            self._next_id += 1
            self._incoming.append(Slot(rid, request, sink, self.tokenizer, self.eos, self.device))
            self._wake.notify()
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request (client gone); its row leaves the batch before the next decode step."""
        with self._lock:
            self._cancel.add(rid)
            self._wake.notify()

    def close(self) -> None:
        """Take no new requests (submit raises ShuttingDown); the outstanding ones go on."""
        with self._lock:
            self._closed = True

    def abort(self) -> None:
        """End every outstanding request with Failure(shutdown=True) at the next step (the grace period of a
        shutdown is over)."""
        with self._lock:
            self._closed = self._abort = True
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._prefilling) + len(self._ready) + len(self._running)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def health(self) -> dict[str, Any]:
        """Outstanding work and the watchdog's view: `stalled_s` is how long the engine has gone without
        finishing a step while requests were outstanding; `untracked` > 0 means leaked slots."""
        now = time.monotonic()
        started, outstanding = self._step_started, self._outstanding
        stalled = now - started if started else (now - self._progress_at if outstanding else 0.0)
        return {
            "outstanding": outstanding, "active": self.active, "queued": self.queue_depth,
            "untracked": self.untracked, "alive": self._thread is None or self._thread.is_alive(),
            "stalled_s": round(stalled, 3),
        }  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zamba2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._abort or self._incoming or self._cancel or self._waiting
                           or self.active):  # fmt: skip
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._fail_all(SHUTTING_DOWN, shutdown=True)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: take new requests and cancellations, admit, one prefill chunk budget, first tokens
        and joins, one decode step. Returns whether there was anything to do. Never raises: a failure is
        logged and ends the requests it concerns."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancel = self._cancel, set()
            abort, self._abort = self._abort, False
        self._step_started = time.monotonic()
        worked = False
        try:
            if abort:
                self._fail_all(SHUTTING_DOWN, shutdown=True)
            if cancelled:
                self._apply_cancellations(cancelled)
            while self._waiting and self.active < self.max_concurrency:
                self._admit(self._waiting.popleft())
            worked = bool(self._prefilling or self._ready or self._running)
            if self._prefilling:
                self._prefill_step()
            if self._ready:
                self._join_ready()
            if len(self._running) == 1 and self.speculation is not None:
                self._speculative_step()
            elif self._running:
                self._decode_step()
            elif self.stats.decode_tokens_per_s:
                self.stats.decode_tokens_per_s = 0.0
        except Exception:  # not pinned on one request: fail what was in flight, drop the batch, keep serving
            log.exception("engine step failed; failing the %d requests in flight", self.active)
            self._fail_in_flight("engine step failed (see the server log)")
        finally:
            self._progress_at = time.monotonic()
            self._step_started = 0.0
            self._check_slots()
        return worked

    def _check_slots(self) -> None:
        """The invariant behind --max-concurrency/--max-queue: every outstanding request is in one list."""
        with self._lock:
            held = len(self._incoming) + len(self._waiting) + self.active
            untracked = self._outstanding - held
        if untracked != self.untracked and untracked:
            log.error("%d outstanding requests are in no engine list (leaked slots)", untracked)
        self.untracked = untracked

    def _release(self, seq: Slot) -> None:
        seq.cache = seq.ready_logits = None
        with self._lock:
            self._outstanding -= 1

    def _finish(self, seq: Slot) -> None:
        self.stats.finished += 1
        self._release(seq)

    def _fail(self, seq: Slot, message: str, shutdown: bool = False) -> None:
        """End one request with a Failure (the caller has taken it out of its list)."""
        if not shutdown:
            self.stats.failed += 1
            log.error("request %d failed: %s", seq.id, message)
        seq.emit(Failure(message, shutdown=shutdown))
        self._release(seq)

    def _fail_in_flight(self, message: str, shutdown: bool = False) -> None:
        for seq in self._prefilling + self._ready + self._running:
            self._fail(seq, message, shutdown)
        self._prefilling, self._ready, self._running, self._batch = [], [], [], None

    def _fail_all(self, message: str, shutdown: bool = False) -> None:
        waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            self._fail(seq, message, shutdown)
        self._fail_in_flight(message, shutdown)

    def _apply_cancellations(self, ids: set[int]) -> None:
        for group in (self._waiting, self._prefilling, self._ready):
            for seq in [s for s in group if s.id in ids]:
                group.remove(seq)
                self.stats.cancelled += 1
                self._release(seq)
        rows = [i for i, s in enumerate(self._running) if s.id in ids]
        if rows:
            self.stats.cancelled += len(rows)
            self._leave([], {i: "" for i in rows})

    def _decode_step(self) -> None:
        start = time.perf_counter()
        tokens = torch.tensor([s.next_token for s in self._running], device=self.device)
        try:
            logits = self.model(tokens[:, None], past_key_values=self._batch, logits_to_keep=1).logits[:, -1]
        except Exception:  # the batched step cannot say which row broke it
            log.exception("decode step failed; failing the %d running requests", len(self._running))
            for seq in self._running:
                self._fail(seq, "decode step failed (see the server log)")
            self._running, self._batch = [], None
            return
        finite = torch.isfinite(logits).all(-1).tolist()  # (B,) one row's NaN stays in that row
        picked = pick(self._running, logits)
        finished: list[int] = []
        failed: dict[int, str] = {}
        for i, seq in enumerate(self._running):
            token = picked[i]
            if not finite[i]:
                failed[i] = "the model's logits are not finite (NaN or inf)"
            elif isinstance(token, Exception):
                failed[i] = f"sampling failed: {type(token).__name__}: {token}"
            else:
                try:
                    if seq.advance(token, logits[i]):
                        finished.append(i)
                    self.stats.generated_tokens += 1
                except Exception as exc:
                    log.exception("request %d: output failed", seq.id)
                    failed[i] = f"output failed: {type(exc).__name__}: {exc}"
        rate = len(self._running) / max(time.perf_counter() - start, 1e-9)
        s = self.stats
        s.decode_steps += 1
        s.decode_tokens_per_s = rate if s.decode_tokens_per_s == 0 else 0.8 * s.decode_tokens_per_s + 0.2 * rate
        if finished or failed:
            self._leave(finished, failed, logits)

    def _speculative_step(self) -> None:
        """The one running stream feeds its last token and its drafts in one forward (serve/speculate.py)."""
        start = time.perf_counter()
        seq = self._running[0]
        try:
            if seq.speculator is None:
                seq.speculator = self.speculation.speculator(self.model, self.speculation_stats)
            picked = speculative_step(seq, self._batch, seq.speculator)
        except Exception as exc:  # the batch holds this request alone
            log.exception("request %d: speculative decode step failed", seq.id)
            self._running, self._batch = [], None
            self._fail(seq, f"decode step failed: {type(exc).__name__}: {exc}")
            return
        emitted, done, failure = emit(seq, picked)
        s = self.stats
        s.generated_tokens += emitted
        s.decode_steps += 1
        rate = emitted / max(time.perf_counter() - start, 1e-9)
        s.decode_tokens_per_s = rate if s.decode_tokens_per_s == 0 else 0.8 * s.decode_tokens_per_s + 0.2 * rate
        if failure is not None:
            self._leave([], {0: failure})
        elif done:  # the prompt-cache snapshot needs the logits its last token came from
            self._leave([0], {}, picked.logits[emitted - 1 : emitted])

    def _leave(self, finished: list[int], failed: dict[int, str], logits: torch.Tensor | None = None) -> None:
        """Rows `finished` are done (snapshot their state for the prompt cache), rows in `failed` end with
        their message ("" for a cancellation: released quietly); all of them leave the batch."""
        for i in finished:
            seq = self._running[i]
            if self.prompt_cache is not None and logits is not None:
                try:  # the last sampled token was never fed: the row holds the state after tokens[:-1]
                    snap = batching.extract_row(self._batch, i)
                    if snap.seq_len == len(seq.tokens) - 1:
                        self.prompt_cache.put(seq.tokens[:-1], snap, logits=logits[i].clone())
                except Exception:  # only the snapshot is lost
                    log.exception("request %d: prompt-cache snapshot failed", seq.id)
            self._finish(seq)
        for i, message in failed.items():
            if message:
                self._fail(self._running[i], message)
            else:
                self._release(self._running[i])
        gone = set(finished) | set(failed)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._batch = batching.drop_rows(self._batch, keep, pool=self._state_rows)
        self._running = [self._running[i] for i in keep]
