"""Arguments that code written against transformers passes and zamba2 does not take: one clear error each.

`from_pretrained`, `generate` and the tokenizer call name every argument they honour in their signatures. What is
left of a transformers call arrives in their `**unsupported` and is checked here, never passed on: a value that
changes nothing here (num_beams=1, use_cache=True, trust_remote_code=False...) is accepted; any other value is a
TypeError naming the argument and what to use instead; a name transformers does not have either is a TypeError
that says so (a typo, usually).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# name -> (values that change nothing here, what to do instead)
Table = Mapping[str, tuple[tuple[Any, ...], str]]

_BEAMS = "beam search is not implemented; use greedy decoding (num_beams=1) or do_sample=True"
_NOT_HERE = "not implemented here; see help(zamba2.generation.generate) for the sampling controls"

FROM_PRETRAINED: Table = {
    "trust_remote_code": ((True, False, None), ""),
    "low_cpu_mem_usage": ((True, False, None), ""),  # loading is always tensor by tensor from the memory map
    "use_safetensors": ((True, None), "only safetensors are read (pickles never are)"),
    "attn_implementation": ((None, "sdpa", "eager"), "attention runs torch SDPA (prompts) and small matmuls (decode)"),
    "local_files_only": ((False, None), "set HF_HUB_OFFLINE=1 to use only the local cache"),
    "force_download": ((False, None), "delete the snapshot from the hub cache (huggingface-cli delete-cache)"),
    "subfolder": (("", None), "pass the subfolder's own path (download the repository first for a hub id)"),
    "variant": ((None,), "only model.safetensors / model.safetensors.index.json are read"),
    "load_in_8bit": ((False, None), "use quantize='int8' (weight-only int8)"),
    "load_in_4bit": ((False, None), "use quantize='int4' (weight-only int4, groups of 64)"),
    "quantization_config": ((None,), "use quantize='int8' or quantize='int4'"),
    "max_memory": ((None,), "the model is loaded whole onto one device (device= / device_map=)"),
    "offload_folder": ((None,), "the model is loaded whole onto one device (device= / device_map=)"),
    "tp_plan": ((None,), "use the tensor-parallel path: torchrun --nproc-per-node N -m zamba2 generate --tp N"),
    "output_loading_info": ((False, None), "loading fails naming any missing or unexpected key, so there is none"),
    "gguf_file": ((None,), "convert the GGUF file to safetensors first"),
}

GENERATE: Table = {
    "num_beams": ((1, None), _BEAMS),
    "num_beam_groups": ((1, None), _BEAMS),
    "diversity_penalty": ((0.0, None), _BEAMS),
    "length_penalty": ((1.0, None), _BEAMS),
    "early_stopping": ((False, None), _BEAMS),
    "num_return_sequences": ((1, None), "repeat the rows instead (input_ids.repeat(n, 1), likewise the mask)"),
    "use_cache": ((True, None), "generation always runs through the preallocated hybrid cache"),
    "output_attentions": ((False, None), "call the model on the generated ids with output_attentions=True"),
    "output_hidden_states": ((False, None), "call the model on the generated ids with output_hidden_states=True"),
    "min_length": ((0, None), "use min_new_tokens"),
    "typical_p": ((1.0, None), "use top_p or min_p"),
    "epsilon_cutoff": ((0.0, None), "use min_p"),
    "eta_cutoff": ((0.0, None), "use min_p"),
    "no_repeat_ngram_size": ((0, None), "use repetition_penalty, presence_penalty or frequency_penalty"),
    "encoder_repetition_penalty": ((1.0, None), "use repetition_penalty"),
    "bad_words_ids": ((None,), _NOT_HERE),
    "force_words_ids": ((None,), _NOT_HERE),
    "constraints": ((None,), _NOT_HERE),
    "suppress_tokens": ((None,), _NOT_HERE),
    "begin_suppress_tokens": ((None,), _NOT_HERE),
    "sequence_bias": ((None,), _NOT_HERE),
    "forced_bos_token_id": ((None,), "put the token at the end of the prompt"),
    "forced_eos_token_id": ((None,), _NOT_HERE),
    "exponential_decay_length_penalty": ((None,), _NOT_HERE),
    "renormalize_logits": ((False, None), _NOT_HERE),
    "remove_invalid_values": ((False, None), _NOT_HERE),
    "logits_processor": ((None,), "use the sampling controls, or your own loop over zamba2.generation.decode_step"),
    "stopping_criteria": ((None,), "use eos_token_id or stop_strings= with tokenizer="),
    "prefix_allowed_tokens_fn": ((None,), _NOT_HERE),
    "penalty_alpha": ((None,), "contrastive search is not implemented"),
    "dola_layers": ((None,), "DoLa decoding is not implemented"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance is not implemented"),
    "max_time": ((None,), "use max_new_tokens, or stop a streamer / generate_iter loop yourself"),
    "watermarking_config": ((None,), _NOT_HERE),
    "token_healing": ((False, None), _NOT_HERE),
    "low_memory": ((None, False), _BEAMS),
    "synced_gpus": ((None, False), "generation runs in one process"),
    "cache_implementation": ((None,), "generation always runs through the preallocated hybrid cache"),
    # Speculative decoding: these only tune the speed of assisted generation in transformers, never its output;
    # here the draft length adapts by itself (zamba2/speculative.py).
    "num_assistant_tokens_schedule": ((None, "constant", "heuristic", "heuristic_transient"), ""),
    "assistant_confidence_threshold": ((None, 0.4), "the draft length adapts by itself (zamba2/speculative.py)"),
    "assistant_tokenizer": ((None,), "the draft model must share the model's vocabulary (same tokenizer)"),
    "tokenizer_kwargs": ((None,), "the draft model must share the model's vocabulary (same tokenizer)"),
    "bos_token_id": ((), "the prompt must hold at least one token; put the bos token in it"),
    "inputs": ((), "pass the prompt ids as input_ids= (or the first positional argument)"),
}

TOKENIZER_CALL: Table = {
    "return_token_type_ids": ((False, None), "Zamba2 takes no token type ids"),
    "return_attention_mask": ((True, None), "the mask is always returned; ignore it if unwanted"),
    "return_overflowing_tokens": ((False,), "split long texts yourself before the call"),
    "return_special_tokens_mask": ((False,), "compare ids with tokenizer.special_ids"),
    "return_offsets_mapping": ((False,), "use tokenizer.backend.encode(text).offsets"),
    "return_length": ((False,), "use attention_mask.sum(-1)"),
    "is_split_into_words": ((False,), "join the words into one text"),
    "stride": ((0,), "split long texts yourself before the call"),
    "verbose": ((True, False), ""),
    "text_target": ((None,), "Zamba2 is decoder-only: tokenize the target as text"),
}


def reject(where: str, unsupported: Mapping[str, Any], table: Table) -> None:
    """Raise TypeError for the first argument of `unsupported` that would change anything; accept no-ops."""
    for name, value in unsupported.items():
        if name not in table:
            raise TypeError(
                f"{where}: unexpected argument {name}={value!r} (neither a zamba2 argument nor a transformers "
                "one it knows: a typo?)"
            )
        no_ops, instead = table[name]
        if not any(_same(value, v) for v in no_ops):
            raise TypeError(f"{where}: {name}={value!r} is not supported: {instead}")


def _same(value: Any, no_op: Any) -> bool:
    """value == no_op for plain values, bools kept apart from ints (True is not num_beams=1)."""
    if value is no_op:
        return True
    if value is None or no_op is None or isinstance(value, bool) != isinstance(no_op, bool):
        return False
    return isinstance(value, (int, float, str)) and value == no_op
