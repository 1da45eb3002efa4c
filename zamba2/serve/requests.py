"""One request inside the engine: what was asked (GenerationRequest), what goes back (Progress, Output,
Failure events, through a `sink` callable) and the per-request state between steps (`Slot`).

A Slot turns each sampled token into an Output: logprobs, text through a StreamDecoder, and stop handling,
because stop strings end a sequence: text that could be the start of a stop string is held back until it is
decided. `pick` chooses the next token of several Slots from one batch of logits, `fair_shares` splits
the prefill budget between prompts. Everything here runs on the engine thread; a failure in it concerns
this request alone.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zamba2.cache import HybridCache
from zamba2.sampling import SamplingParams, logprobs, sample_next
from zamba2.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("zamba2.serve")

MAX_TOP_LOGPROBS = 20
# Prompt ids a completion's text is decoded after (enough for any word boundary or multi-byte character).
DECODE_CONTEXT = 8


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a random seed
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k most likely
    ignore_eos: bool = False
    # None: off; k >= 0: score the prompt too (echo): the logprob of every prompt token after the first, from
    # the prefill itself (zamba2.eval.score_chunk), and its k most likely; then max_tokens may be 0.
    prompt_logprobs: int | None = None
    # The text continues the prompt (a completion): decoded after the prompt's last ids, so a leading space
    # of the first token is kept. Off for chat, whose answer starts a new text.
    continue_text: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    text_offset: int  # characters of completion text before this token (0 for prompt tokens: see protocol)
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
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (request.prompt_logprobs), first Output


@dataclass
class Failure:
    """The request ended without an answer. `message` is for the server log, not for clients (it may hold
    internal detail); `shutdown` says the server is stopping rather than that something broke."""

    message: str
    shutdown: bool = False


Event = Progress | Output | Failure
Sink = Callable[[Event], None]


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of some stop string (to hold back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Slot:
    """The engine's state for one request, from submit to its last event."""

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
        context = request.prompt_ids[-DECODE_CONTEXT:] if request.continue_text else ()
        self.decoder = None if tokenizer is None else StreamDecoder(tokenizer, skip_special_tokens=True,
                                                                   context=context)  # fmt: skip
        # the scored prompt tokens (request.prompt_logprobs), sent with the first Output
        self.prompt_scores: list[TokenLogprob] | None = [] if request.prompt_logprobs is not None else None
        self.cache: HybridCache | None = None  # batch 1, while prefilling
        self.ready_logits: torch.Tensor | None = None  # (V,) of a prompt found whole in the prompt cache
        self.prefilled = 0  # prompt tokens in self.cache
        self.cached_tokens = 0
        self.next_token = -1  # sampled, not yet fed to the model
        self.generated = 0
        self.text_len = 0  # characters decoded so far (emitted or held)
        self.held = ""  # decoded text that may be the start of a stop string
        self.speculator = None  # zamba2.speculative.Speculator, made when the stream first decodes alone

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.prefilled

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("request %d: sink failed", self.id, exc_info=True)

    def advance(self, token: int, logits: torch.Tensor) -> bool:
        """Record a sampled token (logits (V,) it came from), emit its Output; return whether it is finished."""
        req = self.request
        lp = None
        if req.logprobs is not None:
            row = logprobs(logits[None])[0]  # (V,) fp32, before penalties and temperature
            top: list[tuple[int, float]] = []
            if req.logprobs > 0:
                values, ids = torch.topk(row, req.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            lp = [TokenLogprob(token, float(row[token]), self.text_len, top)]
        self.tokens.append(token)
        self.generated += 1
        self.next_token = token
        finish = None
        new = ""
        if token in self.eos:
            finish = "stop"
        elif self.decoder is not None:
            new = self.decoder.push(token)
        if finish is None and self.generated >= req.max_tokens:
            finish = "length"
        if finish is not None and self.decoder is not None:
            new += self.decoder.flush()
        self.text_len += len(new)
        text, self.held = self.held + new, ""
        if req.stop:
            cuts = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
            elif finish is None:
                hold = partial_stop(text, req.stop)
                if hold:
                    text, self.held = text[:-hold], text[-hold:]
        scored, self.prompt_scores = self.prompt_scores, None
        self.emit(Output(text, [token], lp, finish, self.prompt_len, self.generated, self.cached_tokens, scored))
        return finish is not None

    def prompt_only(self) -> None:
        """Answer a request for its prompt's scores alone (max_tokens 0): one Output, no token."""
        self.emit(Output("", [], None, "length", self.prompt_len, 0, 0, self.prompt_scores))


def fair_shares(remaining: Sequence[int], budget: int) -> list[int]:
    """Split a prefill budget between prompts with `remaining` tokens each (water-filling, shortest first):
    every prompt gets at least budget // n tokens, a prompt that needs less takes only what it needs and
    leaves the rest to the longer ones. [10, 5000] with 256 -> [10, 246]; [5000, 5000] -> [128, 128]."""
    shares = [0] * len(remaining)
    left = budget
    order = sorted(range(len(remaining)), key=lambda i: remaining[i])
    for k, i in enumerate(order):
        if left <= 0:
            break
        shares[i] = min(remaining[i], max(left // (len(order) - k), 1))
        left -= shares[i]
    return shares


def pick(seqs: list[Slot], logits: torch.Tensor) -> list[int | Exception]:
    """One token per row of logits (B, V), each sequence with its own parameters and generator; greedy rows
    without penalties share one argmax. A row whose sampling raised gets the exception instead (it concerns
    that request only)."""
    out: list[int | Exception] = [0] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.plain_greedy]
    if plain:
        if len(plain) == len(seqs):
            out = list(logits.float().argmax(-1).tolist())
        else:
            rows = torch.tensor(plain, device=logits.device)
            for i, t in zip(plain, logits.index_select(0, rows).float().argmax(-1).tolist(), strict=True):
                out[i] = t
    for i, seq in enumerate(seqs):
        if seq.plain_greedy:
            continue
        try:
            prev = torch.tensor([seq.tokens], device=logits.device) if seq.use_history else None
            out[i] = int(sample_next(logits[i : i + 1], seq.request.params, seq.generator, prev)[0])
        except Exception as exc:
            log.error("request %d: sampling failed", seq.id, exc_info=exc)
            out[i] = exc
    return out
