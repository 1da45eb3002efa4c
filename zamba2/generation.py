"""Generation: one prefill of the prompt, then one-token steps through the hybrid cache.

The loop works on token ids only. A tokenizer is needed only for `stop_strings` (to see text); streaming text is
done on top by whatever consumes `generate_iter` or a `streamer` (zamba2.tokenizer.StreamDecoder turns ids into
text). Batches are left-padded: each row's state stays zero until its first real token, so every row generates
what it would alone. Rows that finish (EOS or a stop string) emit `pad_token_id` until the longest is done.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from zamba2 import compat
from zamba2.cache import HybridCache
from zamba2.generation_config import GenerationConfig, merged
from zamba2.sampling import SamplingParams, pick_from, processed_logits, sample_next

if TYPE_CHECKING:
    from zamba2.speculative import SpeculationStats

DEFAULT_MAX_NEW_TOKENS = 20
# Prompts are prefilled in pieces of this many tokens, so activations stay bounded for any length.
PREFILL_CHUNK = 512
# Prompts longer than LONG_PROMPT use LONG_PROMPT_CHUNK pieces, fixed for the whole prompt: activations shrink with
# the piece while attention over the long context, which dominates there, costs the same per token. 16k tokens at
# 1.2B, fresh process: peak RSS weights + 2.12 GB with 512, 2.01 with 256, 2.00 with 192, in 208-256 s each.
# Fewer queries per call got slower: 128 measured 35% slower per token (as we read torch's CPU flash kernel, it
# takes queries in blocks of 32 below 192 and of 64 from 192 on, and reads all of K/V once per block).
LONG_PROMPT = 4096
LONG_PROMPT_CHUNK = 192


class Streamer(Protocol):
    def put(self, tokens: torch.Tensor) -> None: ...  # (B,) the tokens of one step
    def end(self) -> None: ...


class _TextSource(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


def _eos_set(eos_token_id: int | Sequence[int] | None, config_eos) -> list[int]:
    eos = config_eos if eos_token_id is None else eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def check_finite(logits: torch.Tensor, n: int, rows: torch.Tensor | None = None) -> None:
    """Refuse to pick a token from NaN or infinite logits (B, V) of the rows that are still generating: argmax
    and sampling would return an arbitrary id (token 0) as if it were an answer."""
    bad = ~torch.isfinite(logits).all(-1)
    if rows is not None:
        bad &= rows
    if bool(bad.any()):
        which = bad.nonzero()[:, 0].tolist()
        raise FloatingPointError(
            f"the model's logits are not finite (NaN or inf) at new token {n} in row(s) {which}: the weights or the "
            "activations overflowed; float16 overflows most easily, try dtype=torch.bfloat16 or torch.float32"
        )


def _check_tensor(input_ids: Any) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}; "
            "call the tokenizer with return_tensors='pt'"
        )


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: HybridCache,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Run the prompt (B, T) through the model into `cache`; return the last position's logits (B, V).

    `chunk_size`: tokens per forward call; by default PREFILL_CHUNK, or LONG_PROMPT_CHUNK past LONG_PROMPT."""
    T = input_ids.shape[1]
    if chunk_size is None:
        chunk_size = LONG_PROMPT_CHUNK if T > LONG_PROMPT else PREFILL_CHUNK
    logits = None
    # Fixed-size chunks: shrinking them as the context grows (to bound the (chunk, keys) attention mask) was
    # measured at 16k tokens to raise peak RSS by 0.27 GB, the heap fragmenting over the changing sizes.
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        mask = None if attention_mask is None else attention_mask[:, :end]
        out = model(input_ids[:, start:end], attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """Feed one token per row (B,); return the next logits (B, V)."""
    return model(tokens[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def generate_iter(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: _TextSource | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    generation_config: GenerationConfig | None = None,
    scores: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None,
    assistant_model: Any | None = None,
    num_assistant_tokens: int | None = None,
    speculation_stats: SpeculationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens of each step, (B,) long, finished rows holding pad_token_id.

    Arguments left None come from `generation_config`, else `model.generation_config` (generation_config.json),
    else the built-in defaults (zamba2/generation_config.py). `scores`, when given, receives each step's
    (raw logits, processed scores) pair, both (B, V) fp32.

    Speculative decoding (batch 1, zamba2/speculative.py): `prompt_lookup_num_tokens=k` proposes up to k tokens
    by n-gram lookup in the prompt and the text so far (n = `max_matching_ngram_size` (2) down to 1);
    `assistant_model=draft` (a smaller Zamba2 with the same vocabulary) proposes up to `num_assistant_tokens`
    (4). Greedy output is plain greedy's; sampled output has the plain distribution. `speculation_stats` (a
    zamba2.speculative.SpeculationStats) receives the proposal and acceptance counts."""
    _check_tensor(input_ids)
    gen = merged(
        generation_config if generation_config is not None else getattr(model, "generation_config", None),
        max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop_strings=stop_strings, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        max_matching_ngram_size=max_matching_ngram_size, num_assistant_tokens=num_assistant_tokens,
    )  # fmt: skip
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    config = model.config
    b, T = input_ids.shape
    if T > config.max_position_embeddings:
        message = f"the prompt has {T} tokens, more than max_position_embeddings = {config.max_position_embeddings}"
        if config.use_mem_rope:
            raise ValueError(message + " (RoPE positions past it were never trained)")
        warnings.warn(message + "; without RoPE the model has no hard limit, but quality may suffer", stacklevel=3)
    # An explicit length wins over the config's; max_new_tokens over max_length (which counts the prompt).
    if max_new_tokens is None and max_length is None:
        max_new_tokens, max_length = gen.max_new_tokens, gen.max_length
    if max_new_tokens is None:
        max_new_tokens = max(0, max_length - T) if max_length is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    min_new_tokens = gen.min_new_tokens
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    params = SamplingParams(
        do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p,
        repetition_penalty=gen.repetition_penalty, presence_penalty=gen.presence_penalty,
        frequency_penalty=gen.frequency_penalty,
    ).validate()  # fmt: skip
    stop_strings, eos_token_id, pad_token_id = gen.stop_strings, gen.eos_token_id, gen.pad_token_id
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer= to read the generated text")
    eos = torch.tensor(_eos_set(eos_token_id, config.eos_token_id), dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    speculator = _speculator(model, gen, assistant_model, num_assistant_tokens, max_matching_ngram_size,
                             speculation_stats, b)  # fmt: skip
    if speculator is not None and attention_mask is not None and not bool(attention_mask.all()):
        input_ids = input_ids[:, attention_mask[0].to(torch.bool)]  # one row: its padding only shifts it
        attention_mask, T = None, input_ids.shape[1]
        if T == 0:
            raise ValueError("attention_mask masks every prompt token: nothing to continue from")
    if max_new_tokens == 0:
        return

    device = input_ids.device
    total = T + max_new_tokens
    # Every id seen so far (for the penalties), preallocated; `seen` marks real tokens (not padding).
    history = torch.full((b, total), pad, dtype=torch.long, device=device)
    history[:, :T] = input_ids
    seen = torch.zeros(b, total, dtype=torch.bool, device=device)
    seen[:, :T] = True if attention_mask is None else attention_mask.to(torch.bool)
    use_history = params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0

    cache = model.model.new_cache(b, total, device=device)
    logits = prefill(model, input_ids, attention_mask, cache)
    stop_tail = max((len(s) for s in stop_strings), default=0) if stop_strings else 0

    def hit_stop(row: int, pos: int) -> bool:
        """Whether a stop string ends at history position pos (decoding only a tail that can hold one: each
        token is >= 1 character)."""
        tail = tokenizer.decode(history[row, max(T, pos + 1 - stop_tail - 8) : pos + 1].tolist())
        return any(s in tail for s in stop_strings)

    if speculator is not None:
        from zamba2.speculative import generate_tokens  # speculative.py builds on this module's prefill / steps

        yield from generate_tokens(
            speculator, cache, logits, history, T, max_new_tokens, min_new_tokens, params, generator,
            eos.tolist(), (lambda pos: hit_stop(0, pos)) if stop_strings else None, scores,
        )  # fmt: skip
        return
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for n in range(max_new_tokens):
        pos = T + n
        raw = logits
        check_finite(raw, n, ~finished)
        if n < min_new_tokens and len(eos):
            logits = logits.index_fill(-1, eos, float("-inf"))  # no end of sequence before min_new_tokens
        prev = (history[:, :pos], seen[:, :pos]) if use_history else (None, None)
        if scores is not None:
            processed = processed_logits(logits, params, *prev)  # once: recorded, then picked from
            scores.append((raw.float(), processed))
            tokens = pick_from(processed, params, generator)
        else:
            tokens = sample_next(logits, params, generator, *prev)
        tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        history[:, pos] = tokens
        seen[:, pos] = ~finished
        if len(eos):
            finished |= torch.isin(tokens, eos)
        if stop_strings:
            for row in range(b):
                if not finished[row] and hit_stop(row, pos):
                    finished[row] = True
        yield tokens
        if bool(finished.all()) or n == max_new_tokens - 1:
            return
        logits = decode_step(model, tokens, cache)


def _speculator(model, gen: GenerationConfig, assistant_model, num_assistant_tokens: int | None,
                max_matching_ngram_size: int | None, stats: SpeculationStats | None, batch: int):  # fmt: skip
    """The Speculator the arguments ask for, or None; every bad combination is refused here, by name.
    `num_assistant_tokens` / `max_matching_ngram_size` passed to the call need their proposer; from a
    generation config (where transformers keeps defaults for them) they are ignored without it."""
    lookup = gen.prompt_lookup_num_tokens
    if lookup is not None and assistant_model is not None:
        raise ValueError("pass prompt_lookup_num_tokens or assistant_model, not both (one proposer at a time)")
    if assistant_model is None and num_assistant_tokens is not None:
        raise ValueError("num_assistant_tokens needs assistant_model= (the draft model that proposes them)")
    if lookup is None and max_matching_ngram_size is not None:
        raise ValueError("max_matching_ngram_size needs prompt_lookup_num_tokens= (the n-gram proposer)")
    if lookup is None and assistant_model is None:
        if stats is not None:
            raise ValueError("speculation_stats needs prompt_lookup_num_tokens= or assistant_model=")
        return None
    from zamba2 import speculative

    if batch != 1:
        raise ValueError(f"speculative decoding supports batch size 1, got {batch} rows")
    if lookup is not None:
        ngram = gen.max_matching_ngram_size
        proposer = speculative.PromptLookup(speculative.DEFAULT_NGRAM_SIZE if ngram is None else ngram)
        k, name = lookup, "prompt_lookup_num_tokens"
    else:
        vocab = getattr(getattr(assistant_model, "config", None), "vocab_size", None)
        if vocab != model.config.vocab_size or not hasattr(assistant_model, "model"):
            raise ValueError(
                f"assistant_model must be a Zamba2ForCausalLM with the model's vocab_size "
                f"({model.config.vocab_size}), got {type(assistant_model).__name__} with vocab_size {vocab}"
            )
        proposer = speculative.DraftModel(assistant_model)
        k = gen.num_assistant_tokens if gen.num_assistant_tokens is not None else speculative.DEFAULT_DRAFT_TOKENS
        name = "num_assistant_tokens"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be an int >= 1, got {k!r}")
    return speculative.Speculator(model, proposer, k, stats)


@dataclass
class GenerateDecoderOnlyOutput:
    """What generate returns with return_dict_in_generate=True (transformers' name and fields)."""

    sequences: torch.Tensor  # (B, T + n) prompt + new tokens
    scores: tuple[torch.Tensor, ...] | None = None  # per step (B, V): processed scores (output_scores)
    logits: tuple[torch.Tensor, ...] | None = None  # per step (B, V): raw logits (output_logits)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: _TextSource | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    generation_config: GenerationConfig | None = None,
    return_dict_in_generate: bool | None = None,
    output_scores: bool | None = None,
    output_logits: bool | None = None,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None,
    assistant_model: Any | None = None,
    num_assistant_tokens: int | None = None,
    speculation_stats: SpeculationStats | None = None,
    **unsupported: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Generate continuations; returns prompt + new tokens (B, T + n) like transformers' `generate`.

    Greedy by default; `do_sample=True` samples with temperature / top_k / top_p / min_p (0 / 1.0 / 0 = off).
    `seed` or `generator` makes sampling reproducible. `eos_token_id` (int or list) defaults to the config's.
    Arguments left None come from `generation_config`, else the model's (generation_config.json), else the
    built-in defaults. `min_new_tokens` holds end-of-sequence back until that many tokens are out.
    `return_dict_in_generate=True` returns a GenerateDecoderOnlyOutput (`.sequences`, and per-step `.scores` /
    `.logits` with output_scores / output_logits). Speculative decoding (batch 1): `prompt_lookup_num_tokens=k`
    (with `max_matching_ngram_size`) or `assistant_model=draft` (with `num_assistant_tokens`), the same tokens
    (greedy) or distribution (sampling) faster; see generate_iter. Other transformers arguments (num_beams=1,
    use_cache=True...) are accepted where they change nothing, else refused naming what to use instead
    (zamba2/compat.py).
    """
    compat.reject("generate", unsupported, compat.GENERATE)
    _check_tensor(input_ids)
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    out = merged(config, return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                 output_logits=output_logits)  # fmt: skip
    scores: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if out.output_scores or out.output_logits else None
    steps = generate_iter(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, max_length=max_length,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        stop_strings=stop_strings, tokenizer=tokenizer, seed=seed, generator=generator,
        generation_config=generation_config, scores=scores, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        max_matching_ngram_size=max_matching_ngram_size, assistant_model=assistant_model,
        num_assistant_tokens=num_assistant_tokens, speculation_stats=speculation_stats,
    )  # fmt: skip
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = []
    for tokens in steps:
        new.append(tokens)
        if streamer is not None:
            streamer.put(tokens)
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids.clone()
    if not out.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences,
        scores=tuple(s for _, s in scores) if out.output_scores else None,
        logits=tuple(r for r, _ in scores) if out.output_logits else None,
    )
