"""Bytes a model holds and streams per decode step, the memory bandwidth that bounds decode, and peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.config import Zamba2Config

GB = 1e9


# ---- bytes ---------------------------------------------------------------------------------------


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (quantised codes and scales included)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def reread_bytes(model: nn.Module) -> int:
    """Extra bytes a decode step reads because each shared block is streamed again at every hybrid layer after
    its first (its weights do not stay in cache between uses). Ours reads only the hidden half of q/k/v on
    those later uses (the embedding half is computed once per block), the reference the whole block."""
    extra, seen = 0, set()
    hybrids = [layer for layer in model.model.layers if hasattr(layer, "shared_transformer")]
    for j, layer in enumerate(hybrids):
        block = layer.shared_transformer
        key = id(block.self_attn.o_proj.weight) if hasattr(block.self_attn.o_proj, "weight") else id(block)
        if key in seen:
            # the block's weights and buffers plus this hybrid ordinal's own adapters (slot j)
            extra += sum(
                t.numel() * t.element_size()
                for name, t in [*block.named_parameters(), *block.named_buffers()]
                if "adapter_list." not in name or f"adapter_list.{j}." in name
            )
            attn = block.self_attn
            if getattr(attn, "can_split", False):
                extra -= sum(_linear_bytes(p) // 2 for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        seen.add(key)
    return extra


def _linear_bytes(linear: nn.Module) -> int:
    """What one product streams: a float weight's bytes, or a QuantizedLinear's codes and scales."""
    if hasattr(linear, "weight_bytes"):
        return linear.weight_bytes()
    return linear.weight.numel() * linear.weight.element_size()


def streamed_bytes(model: nn.Module) -> int:
    """Bytes one decode step reads for one token: each distinct tensor once, a QuantizedLinear as its
    `weight_bytes()`, and an embedding table that no float Linear reads (untied, or its tied lm_head was
    quantised) as the one row the step looks up."""
    quantized = [m for m in model.modules() if hasattr(m, "weight_bytes") and hasattr(m, "qweight")]
    skip = {id(t) for m in quantized for t in m.buffers(recurse=False)}
    total = sum(m.weight_bytes() for m in {id(m): m for m in quantized}.values())
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    for t in _unique_tensors(model):
        if id(t) in skip:
            continue
        if id(t) in embeddings and id(t) not in linear_weights:
            total += t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(config: Zamba2Config, dtype: torch.dtype) -> int:
    """Bytes of our model's distinct nn.Linear weights in `dtype` (measured on a meta build, no memory)."""
    from zamba2.model import Zamba2ForCausalLM

    with torch.device("meta"):
        model = Zamba2ForCausalLM(config)
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() for w in weights.values()) * dtype.itemsize


@torch.inference_mode()
def measure_bandwidth(total_bytes: int, dtype: torch.dtype, repeats: int = 5) -> dict[str, Any]:
    """GB/s of batch-1 F.linear over (8192, 2048) matrices adding up to `total_bytes`: what decode streams."""
    cols = 2048
    rows = max(1, min(8192, total_bytes // (cols * dtype.itemsize)))
    n = max(1, round(total_bytes / (rows * cols * dtype.itemsize)))
    # full_, not zeros: untouched calloc pages all map the one zero page and would read from cache.
    mats = [torch.full((rows, cols), 0.01, dtype=dtype) for _ in range(n)]
    x = torch.full((1, cols), 0.5, dtype=dtype)
    for w in mats:
        F.linear(x, w)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for w in mats:
            F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    size = n * rows * cols * dtype.itemsize
    return {
        "gb_per_s": size / best / GB,
        "buffer_bytes": size,
        "matrices": n,
        "shape": [rows, cols],
        "seconds": best,
    }


# ---- peak RSS -------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started or since `reset_peak_rss()`.

    Linux's VmHWM, not ru_maxrss: subprocess starts workers by vfork + exec, and ru_maxrss carries the
    parent's peak (here up to a whole model) over the exec, while VmHWM belongs to the new process alone.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux, bytes on macOS: a bound


def reset_peak_rss() -> None:
    """Start a new peak (Linux: "5" to clear_refs resets VmHWM); where that is not possible the next
    `peak_rss_bytes()` is the peak so far, still an upper bound of the phase.

    First the heap's free pages go back to the system (glibc `malloc_trim`): glibc keeps some memory freed by
    one phase, and without this a phase's peak would carry what earlier phases left behind, which a fresh
    process doing only that work would not have. Done the same way for both implementations."""
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

