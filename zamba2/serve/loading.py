"""What `zamba2 serve` loads before it answers: the model, its tokenizer, a draft model, and the engine."""

from __future__ import annotations

import argparse
import logging

import torch

from zamba2.checkpoint import eos_token_ids, read_config, resolve_model_dir
from zamba2.model import Zamba2ForCausalLM
from zamba2.serve.engine import Engine
from zamba2.serve.speculate import SpeculationSettings
from zamba2.speculative import check_draft_vocab
from zamba2.tokenizer import Tokenizer

log = logging.getLogger("zamba2.serve")


def engine_for(a: argparse.Namespace) -> tuple[Engine, Tokenizer]:
    """Load the model and tokenizer the arguments name and build the (not yet started) engine over them."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.compile:
        from zamba2.ops import compiled

        compiled.enable(True)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = resolve_model_dir(a.model)
    log.info("loading %s (%s, dtype %s, quantize %s, adapter %s)", folder, device, a.dtype, a.quantize, a.adapter)
    model = Zamba2ForCausalLM.from_pretrained(
        folder, dtype=a.dtype, device=device, quantize=a.quantize, progress=False, adapter=a.adapter
    )
    tokenizer = Tokenizer.from_pretrained(folder)
    context = model.config.max_position_embeddings
    if a.max_model_len is not None and a.max_model_len > context:
        raise ValueError(f"--max-model-len {a.max_model_len} is more than the model's context "
                         f"(max_position_embeddings {context})")  # fmt: skip
    engine = Engine(
        model, tokenizer, max_concurrency=a.max_concurrency, max_queue=a.max_queue,
        prefill_chunk=a.prefill_chunk, prompt_cache_bytes=int(a.prompt_cache_mb * 2**20),
        eos_token_ids=eos_token_ids(folder, model.config.eos_token_id, tokenizer),
        max_model_len=a.max_model_len or context, speculation=speculation(a, model, device),
    )  # fmt: skip
    return engine, tokenizer


def speculation(a: argparse.Namespace, model, device) -> SpeculationSettings | None:
    """--prompt-lookup K or --draft-model PATH [--draft-tokens K]: how a lone stream decodes (serve/speculate.py)."""
    lookup, draft = getattr(a, "prompt_lookup", None), getattr(a, "draft_model", None)
    if lookup is None and draft is None:
        return None
    if draft is None:
        return SpeculationSettings(prompt_lookup=lookup)
    folder = resolve_model_dir(draft)
    check_draft_vocab(draft, model.config.vocab_size, read_config(folder).vocab_size)  # before loading its weights
    log.info("loading the draft model %s", draft)
    assistant = Zamba2ForCausalLM.from_pretrained(folder, dtype=model.dtype, device=device, progress=False).eval()
    return SpeculationSettings(draft_model=assistant, draft_tokens=a.draft_tokens)
