"""The serving engine: continuous batching over one HybridCache, in a thread that owns the model.

Requests go through three stages:

    waiting     submitted, beyond --max-concurrency; a bounded queue (submit raises QueueFull past it)
    prefilling  the prompt runs through the model into the request's own batch-1 cache, at most
                `prefill_chunk` tokens per engine iteration in total, so a long prompt delays the others by
                one chunk per step rather than by its whole length; starts from a prompt-cache snapshot when
                one matches
    running     a row of the shared batch cache; every iteration one decode step feeds each row its last
                token: model(tokens[:, None], past_key_values=batch, logits_to_keep=1)

A finished prefill samples the first token from its last logits, then joins the batch (batch.insert_rows:
conv/SSM states copied into the next of the engine's preallocated state rows, K/V right-aligned). Finished or
cancelled rows leave at once (batch.drop_rows, which also compacts leading padding). Each request has its own
sampling parameters, torch.Generator and penalty history; greedy rows without penalties are picked with one
argmax.

Results go back through a `sink` callable given at submit, called on the engine thread with Progress (a
prefill chunk done), Output (new tokens/text; the last one has finish_reason) or Failure events. Text is
decoded here, because stop strings end a sequence: text that could be the start of a stop string is held
back until it is decided.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zamba2.cache import HybridCache
from zamba2.sampling import SamplingParams, logprobs, sample_next
from zamba2.serve import batch as batching
from zamba2.serve.prompt_cache import PromptCache
from zamba2.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("zamba2.serve")

PREFILL_CHUNK = 256
MAX_TOP_LOGPROBS = 20
# Decode-time K/V headroom reserved when a batch is rebuilt; beyond it the cache grows by doubling.
KV_HEADROOM = 512


class QueueFull(RuntimeError):
    """More requests than --max-concurrency + --max-queue are outstanding."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a random seed
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k most likely
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    text_offset: int  # characters of completion text before this token
    top: list[tuple[int, float]]  # (id, logprob), best first


@dataclass
class Progress:
    """A prefill chunk is done and the prompt is not finished yet."""

    done: int
    total: int


@dataclass
class Output:
    """What one step produced for one request; the last Output has a finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running, then "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose state came from the prompt cache


@dataclass
class Failure:
    message: str


Event = Progress | Output | Failure
Sink = Callable[[Event], None]


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


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of some stop string (to hold back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Sequence:
    def __init__(self, rid: int, request: GenerationRequest, sink: Sink, tokenizer: Tokenizer | None,
                 eos: frozenset[int], device: torch.device) -> None:  # fmt: skip
        self.id = rid
        self.request = request
        self.sink = sink
        self.tokens = list(request.prompt_ids)  # prompt, then generated ids
        self.prompt_len = len(self.tokens)
        seed = request.seed if request.seed is not None else random.SystemRandom().getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        p = request.params
        self.use_history = p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0
        self.plain_greedy = p.greedy and not self.use_history
        self.eos = frozenset() if request.ignore_eos else eos
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.cache: HybridCache | None = None  # batch 1, while prefilling
        self.prefilled = 0  # prompt tokens in self.cache
        self.cached_tokens = 0
        self.next_token = -1  # sampled, not yet fed to the model
        self.generated = 0
        self.text_len = 0  # characters decoded so far (emitted or held)
        self.held = ""  # decoded text that may be the start of a stop string

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("request %d: sink failed", self.id, exc_info=True)


class Engine:
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
        if eos_token_ids is None:
            eos = self.config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos_token_ids.append(tokenizer.eos_token_id)
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.stats = EngineStats()

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[_Sequence] = deque()  # guarded by _lock
        self._cancel: set[int] = set()  # guarded by _lock
        self._outstanding = 0  # submitted and not finished; guarded by _lock
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the engine thread.
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []  # row i of self._batch
        self._batch: HybridCache | None = None
        self._state_rows: batching.StateRows | None = None  # the batch's conv/SSM states, allocated at first join

    # ---- called from any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request; returns its id. Raises QueueFull past max_concurrency + max_queue outstanding."""
        if not request.prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {vocab})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")
        request.params.validate()
        with self._lock:
            if self._outstanding >= self.max_concurrency + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self._outstanding} requests outstanding")
            self._outstanding += 1
            rid = self._next_id
            self._next_id += 1
            self._incoming.append(_Sequence(rid, request, sink, self.tokenizer, self.eos, self.device))
            self._wake.notify()
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request (client gone); its row leaves the batch before the next decode step."""
        with self._lock:
            self._cancel.add(rid)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._prefilling) + len(self._running)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zamba2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._incoming or self._cancel or self._waiting or self.active):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # keep serving: fail what was in flight, drop the batch
                log.exception("engine step failed")
                self._fail_active(f"{type(exc).__name__}: {exc}")
        self._fail_active("server shutting down")
        for seq in self._waiting:
            seq.emit(Failure("server shutting down"))

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: take new requests and cancellations, admit, one prefill chunk budget, one decode
        step. Returns whether there was anything to do."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancel = self._cancel, set()
        if cancelled:
            self._apply_cancellations(cancelled)
        while self._waiting and self.active < self.max_concurrency:
            self._admit(self._waiting.popleft())
        worked = bool(self._prefilling or self._running)
        if self._prefilling:
            self._prefill_step()
        if self._running:
            self._decode_step()
        elif self.stats.decode_tokens_per_s:
            self.stats.decode_tokens_per_s = 0.0
        return worked

    def _release(self, seq: _Sequence) -> None:
        with self._lock:
            self._outstanding -= 1
        self.stats.finished += 1

    def _apply_cancellations(self, ids: set[int]) -> None:
        for group in (self._waiting, self._prefilling):
            for seq in [s for s in group if s.id in ids]:
                group.remove(seq)
                seq.cache = None
                self.stats.cancelled += 1
                self._release(seq)
        rows = [i for i, s in enumerate(self._running) if s.id in ids]
        if rows:
            self.stats.cancelled += len(rows)
            self._leave(rows, snapshot=False)

    def _fail_active(self, message: str) -> None:
        for seq in self._prefilling + self._running:
            seq.emit(Failure(message))
            self._release(seq)
        self._prefilling, self._running, self._batch = [], [], None

    def _admit(self, seq: _Sequence) -> None:
        snap = self.prompt_cache.lookup(seq.tokens) if self.prompt_cache is not None else None
        if snap is not None:
            seq.cache = batching.resume(snap.cache, seq.prompt_len)
            seq.prefilled = seq.cached_tokens = len(snap.tokens)
        else:
            seq.cache = HybridCache(self.config, 1, seq.prompt_len, dtype=self.dtype, device=self.device)
        self._prefilling.append(seq)

    def _prefill_step(self) -> None:
        budget = self.prefill_chunk
        joined: list[tuple[_Sequence, HybridCache]] = []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            n = min(budget, seq.prompt_len - seq.prefilled)
            ids = torch.tensor([seq.tokens[seq.prefilled : seq.prefilled + n]], device=self.device)
            logits = self.model(ids, past_key_values=seq.cache, logits_to_keep=1).logits[:, -1]  # (1, V)
            seq.prefilled += n
            budget -= n
            self.stats.prompt_tokens += n
            if seq.prefilled < seq.prompt_len:
                seq.emit(Progress(seq.prefilled, seq.prompt_len))
                continue
            self._prefilling.remove(seq)
            cache, seq.cache = seq.cache, None
            if self.prompt_cache is not None:  # sized to the prompt: stored as is, never written again
                self.prompt_cache.put(seq.tokens, batching.trimmed(cache))
            if self._advance(seq, self._pick([seq], logits)[0], logits[0]):
                self._release(seq)
            else:
                joined.append((seq, cache))
        if joined:
            seqs = self._running + [s for s, _ in joined]
            longest = max([c.seq_len for _, c in joined] + [self._batch.seq_len if self._batch else 0])
            left = max(s.request.max_tokens - s.generated for s in seqs)
            if self._state_rows is None:
                self._state_rows = batching.StateRows(self.config, self.max_concurrency, self.dtype, self.device)
            self._batch = batching.insert_rows(
                self._batch, [c for _, c in joined], capacity=longest + min(left, KV_HEADROOM), pool=self._state_rows
            )
            self._running = seqs

    def _decode_step(self) -> None:
        start = time.perf_counter()
        tokens = torch.tensor([s.next_token for s in self._running], device=self.device)
        logits = self.model(tokens[:, None], past_key_values=self._batch, logits_to_keep=1).logits[:, -1]
        picked = self._pick(self._running, logits)
        done = [i for i, seq in enumerate(self._running) if self._advance(seq, picked[i], logits[i])]
        rate = len(self._running) / max(time.perf_counter() - start, 1e-9)
        s = self.stats
        s.decode_steps += 1
        s.decode_tokens_per_s = rate if s.decode_tokens_per_s == 0 else 0.8 * s.decode_tokens_per_s + 0.2 * rate
        if done:
            self._leave(done, snapshot=True)

    def _leave(self, rows: list[int], snapshot: bool) -> None:
        """Rows `rows` of the batch are done: snapshot their state (prompt cache), release, drop the rows."""
        for i in rows:
            seq = self._running[i]
            if snapshot and self.prompt_cache is not None:
                # The last sampled token was never fed: the row holds the state after tokens[:-1].
                snap = batching.extract_row(self._batch, i)
                if snap.seq_len == len(seq.tokens) - 1:
                    self.prompt_cache.put(seq.tokens[:-1], snap)
            self._release(seq)
        gone = set(rows)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._batch = batching.drop_rows(self._batch, keep, pool=self._state_rows)
        self._running = [self._running[i] for i in keep]

    # ---- sampling and output ----------------------------------------------------------------------
    def _pick(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row of logits (B, V), each sequence with its own parameters and generator."""
        out = [0] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.plain_greedy]
        if plain:
            if len(plain) == len(seqs):
                out = logits.float().argmax(-1).tolist()
            else:
                rows = torch.tensor(plain, device=logits.device)
                for i, t in zip(plain, logits.index_select(0, rows).float().argmax(-1).tolist(), strict=True):
                    out[i] = t
        for i, seq in enumerate(seqs):
            if seq.plain_greedy:
                continue
            prev = torch.tensor([seq.tokens], device=logits.device) if seq.use_history else None
            out[i] = int(sample_next(logits[i : i + 1], seq.request.params, seq.generator, prev)[0])
        return out

    def _advance(self, seq: _Sequence, token: int, logits: torch.Tensor) -> bool:
        """Record a sampled token for `seq`, emit its Output; return whether the sequence is finished."""
        req = seq.request
        lp = None
        if req.logprobs is not None:
            row = logprobs(logits[None])[0]  # (V,) fp32, before penalties and temperature
            top: list[tuple[int, float]] = []
            if req.logprobs > 0:
                values, ids = torch.topk(row, req.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            lp = [TokenLogprob(token, float(row[token]), seq.text_len, top)]
        seq.tokens.append(token)
        seq.generated += 1
        seq.next_token = token
        self.stats.generated_tokens += 1
        finish = None
        new = ""
        if token in seq.eos:
            finish = "stop"
        elif seq.decoder is not None:
            new = seq.decoder.push(token)
        if finish is None and seq.generated >= req.max_tokens:
            finish = "length"
        if finish is not None and seq.decoder is not None:
            new += seq.decoder.flush()
        seq.text_len += len(new)
        text, seq.held = seq.held + new, ""
        if req.stop:
            cuts = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
            elif finish is None:
                hold = _partial_stop(text, req.stop)
                if hold:
                    text, seq.held = text[:-hold], text[-hold:]
        seq.emit(Output(text, [token], lp, finish, seq.prompt_len, seq.generated, seq.cached_tokens))
        return finish is not None
