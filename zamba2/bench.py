"""Speed and memory benchmark on random weights: ours vs transformers 5.23, ratios measured in one run.

    python -m zamba2.bench --arch 1.2b --dtype bf16 --compare

Measured for each implementation, best of --repeats, ours and the reference taking turns (ABBA) so that
drift of a shared machine hits both:
    prefill   tokens/s of one forward over a prompt of each --lengths tokens (batch 1, into a cache)
    ttft      seconds from a 512-token prompt to its first greedy token, cache allocation included
    decode    tokens/s of --decode-steps one-token steps after a 128-token prompt, at --batch and --batched
    memory    peak RSS of the implementation's own fresh process, per phase, shown as "weights + X"
    bound     batch-1 GEMVs give the memory bandwidth (best of: a buffer as large as the model's linear
              weights, timed before the run, and each model's own linear weights, timed in every repeat);
              decode cannot beat bandwidth / bytes one step streams, and is reported as a fraction of that
    load      (--load) from_pretrained seconds and peak RSS of a freshly written random checkpoint

Each implementation runs in a worker subprocess (`--worker ours|ref`) that builds its model once, then
answers each command from stdin with one JSON line on stdout; `--no-subprocess` runs both here (tests), the
RSS figures then being those of the one shared process. transformers is imported only by the reference worker.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.config import Zamba2Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TTFT_PROMPT = 512  # tokens before the first-token timing
DECODE_PROMPT = 128  # tokens before the decode timing
LONG_PROMPT = 16384  # added by --long
GB = 1e9
# transformers.Zamba2Config does not take these: time_step_limit is ours, rope_theta travels in
# rope_parameters, and the classification fields only matter to a classifier.
_NOT_REFERENCE_FIELDS = {
    "extras",
    "time_step_limit",
    "rope_theta",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
}

# ---- random weights, identical in both implementations -------------------------------------------


@torch.no_grad()
def fill_(t: torch.Tensor, key: str, config: Zamba2Config, seed: int = 0) -> torch.Tensor:
    """Fill `t` in place with the deterministic random value of our state_dict entry `key`.

    The value depends only on (seed, key, shape, dtype), so ours and the reference get the same weights
    tensor by tensor, each built directly in its dtype, without both models or an fp32 copy ever existing.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    name = key.rsplit(".", 1)[-1]
    if name == "A_log":  # A = -exp(A_log) = -(1..H), as Mamba2 initialises it
        t.copy_(torch.log(torch.arange(1, t.numel() + 1, dtype=torch.float32)).view(t.shape))
    elif name == "D":
        t.fill_(1.0)
    elif name == "dt_bias":  # softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max]
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(t.shape, generator=gen) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        t.copy_(dt + torch.log(-torch.expm1(-dt)))
    elif name == "bias":
        t.zero_()
    elif t.dim() == 1:  # norm weights
        t.fill_(1.0)
    else:
        t.normal_(0.0, config.initializer_range, generator=gen)
    return t


def build_ours(config: Zamba2Config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Our Zamba2ForCausalLM with random weights, built on meta, then materialised tensor by tensor."""
    from zamba2.model import Zamba2ForCausalLM

    with torch.device("meta"):
        model = Zamba2ForCausalLM(config)
    real: dict[int, nn.Parameter] = {}
    for key, p in model.named_parameters():  # each tensor once, under its first name (tied ones share it)
        real[id(p)] = nn.Parameter(fill_(torch.empty(p.shape, dtype=dtype), key, config, seed), requires_grad=False)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = real[id(p)]
    model.tie_weights()
    return model.eval()


def quality(config: Zamba2Config, positions: int = 320, seed: int = 0) -> dict[str, dict[str, float]]:
    """Quantisation error next to bf16 rounding, on random weights: relative logit error ||a - b|| / ||b|| and
    top-1 agreement over `positions` prompt positions, for bf16 vs fp32 and int8 / int4 vs bf16."""
    import copy

    fp32 = build_ours(config, torch.float32, seed)
    ids = torch.randint(3, config.vocab_size, (2, positions // 2), generator=torch.Generator().manual_seed(seed))

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, use_cache=False).logits.float()

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return {
            "relative_logit_error": ((a - b).norm() / b.norm()).item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }

    ref32 = logits(fp32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    del fp32
    ref16 = logits(bf16)
    out = {"bf16 vs fp32": compare(ref16, ref32)}
    for mode in ("int8", "int4"):
        q = copy.deepcopy(bf16)
        q.quantize(mode)
        out[f"{mode} vs bf16"] = compare(logits(q), ref16)
        del q
    return out


def reference_key(key: str, config: Zamba2Config) -> str:
    """Our state_dict key holding the value of the reference's `key`.

    The reference keeps a (tied) copy of the shared block under every hybrid layer; hybrid ordinal j uses
    block j % num_mem_blocks, which we register under hybrid layer j % num_mem_blocks.
    """
    m = re.fullmatch(r"model\.layers\.(\d+)\.shared_transformer\.(.+)", key)
    if m is not None:
        hybrid = config.hybrid_layer_ids
        j = hybrid.index(int(m[1]))
        return f"model.layers.{hybrid[j % config.num_mem_blocks]}.shared_transformer.{m[2]}"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return key


def build_reference(config: Zamba2Config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """transformers.Zamba2ForCausalLM of the same architecture in `dtype`, with the same weights as ours."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    # its notes that the CUDA kernels are missing and it falls back to torch: expected on a CPU
    warnings.filterwarnings("ignore", message=".*falling back.*")
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_REFERENCE_FIELDS}
    fields = {k: v for k, v in fields.items() if k in Zamba2Config.__dataclass_fields__}
    ref_config = transformers.Zamba2Config(**fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in dtype: no fp32 copy first
    try:
        model = transformers.Zamba2ForCausalLM(ref_config)
    finally:
        torch.set_default_dtype(previous)
    for key, p in model.named_parameters():
        fill_(p.data, reference_key(key, config), config, seed)
    return model.eval()


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


# ---- one implementation's measurements -----------------------------------------------------------


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


def prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    """Random ids (batch, length), the same in every process for the same sizes."""
    gen = torch.Generator().manual_seed(batch * 100_003 + length)
    return torch.randint(3, vocab, (batch, length), generator=gen)


class Runner:
    """One implementation's model and its timed calls; ours and the reference differ only in `_prefill` and
    `_step`, the calls their own generation loops make."""

    def __init__(self, impl: str, config: Zamba2Config, dtype: torch.dtype, plan: dict[str, Any]) -> None:
        self.impl, self.config, self.plan = impl, config, plan
        if impl == "ref":
            import transformers.models.zamba2.modeling_zamba2  # noqa: F401  (counted in the import RSS)
        else:
            import zamba2.generation  # noqa: F401
            import zamba2.model  # noqa: F401
        # Peak RSS of each phase (reset in between), so that batch-1 use reads apart from batch-8 decode.
        self.phase_peaks: dict[str, int] = {"import": peak_rss_bytes()}
        reset_peak_rss()
        start = time.perf_counter()
        seed = plan["seed"]
        self.model = build_reference(config, dtype, seed) if impl == "ref" else build_ours(config, dtype, seed)
        self.info: dict[str, Any] = {"impl": impl, "quantize": None}
        if impl == "ours" and plan["quantize"]:
            self.info["quantize"] = self._quantize(plan["quantize"])
        if impl != "ref" and plan["compile"]:
            from zamba2.ops import compiled

            compiled.enable(True)
        gc.collect()
        self.info.update(
            build_s=time.perf_counter() - start,
            params=sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values()),
            weight_bytes=weight_bytes(self.model),
            streamed_bytes=streamed_bytes(self.model),
            reread_bytes=reread_bytes(self.model),
        )
        self._phase_done("build")
        self.warmup()
        self._phase_done("warmup")

    def _phase_done(self, name: str) -> None:
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), peak_rss_bytes())
        reset_peak_rss()

    def _quantize(self, mode: str) -> dict[str, Any]:
        if importlib.util.find_spec("zamba2.quant") is None:
            return {"mode": mode, "skipped": "zamba2.quant is not available"}
        from zamba2 import quant

        stats = quant.quantize_model(self.model, mode)
        return {k: stats.get(k) for k in ("mode", "group_size", "quantized", "skipped", "bytes_before", "bytes_after")}

    # The two calls each implementation's own generation loop makes.
    def _prefill(self, ids: torch.Tensor, room: int) -> tuple[torch.Tensor, Any]:
        """Prompt (B, T) -> last logits (B, V) and the cache, which has room for `room` more tokens."""
        if self.impl == "ref":
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], out.past_key_values
        from zamba2.generation import prefill

        cache = self.model.model.new_cache(ids.shape[0], ids.shape[1] + room)
        return prefill(self.model, ids, None, cache), cache

    def _step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """Tokens (B,) -> next logits (B, V); the cache is updated in place."""
        if self.impl == "ref":
            return self.model(tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        from zamba2.generation import decode_step

        return decode_step(self.model, tokens, cache)

    @torch.inference_mode()
    def time_prefill(self, length: int) -> tuple[float, float]:
        """(seconds of the prefill, seconds to the first greedy token) for a batch-1 prompt."""
        ids = prompt(1, length, self.config.vocab_size)
        start = time.perf_counter()
        logits, cache = self._prefill(ids, 1)
        mid = time.perf_counter()
        logits.argmax(-1)
        end = time.perf_counter()
        del cache
        return mid - start, end - start

    @torch.inference_mode()
    def time_decode(self, batch: int, steps: int) -> float:
        """Seconds of `steps` greedy one-token steps for `batch` rows after a 128-token prompt."""
        ids = prompt(batch, DECODE_PROMPT, self.config.vocab_size)
        logits, cache = self._prefill(ids, steps)
        tokens = logits.argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = self._step(tokens, cache).argmax(-1)
        return time.perf_counter() - start

    @torch.inference_mode()
    def time_weights_gemv(self, passes: int = 3) -> tuple[int, float] | None:
        """(bytes, best seconds) of one batch-1 F.linear pass over the model's distinct Linear weights: the
        bandwidth on the very bytes decode reads, sampled in every repeat. None for a quantised model."""
        if any(hasattr(m, "qweight") for m in self.model.modules()):
            return None
        weights = list({id(m.weight): m.weight for m in self.model.modules() if isinstance(m, nn.Linear)}.values())
        xs = {(w.shape[1], w.dtype): torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights}
        best = math.inf
        for _ in range(passes):
            start = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1], w.dtype], w)
            best = min(best, time.perf_counter() - start)
        return sum(w.numel() * w.element_size() for w in weights), best

    @torch.inference_mode()
    def warmup(self) -> None:
        ids = prompt(1, 32, self.config.vocab_size)
        for batch in {1, self.plan["batch"], self.plan["batched"] or 1}:
            logits, cache = self._prefill(ids.expand(batch, -1), 2)
            for _ in range(2):
                logits = self._step(logits.argmax(-1), cache)

    def repeat(self) -> dict[str, Any]:
        """One round of every measurement (seconds)."""
        plan = self.plan
        out: dict[str, Any] = {"prefill": {}, "first_token": {}}
        for length in plan["lengths"]:
            out["prefill"][str(length)], out["first_token"][str(length)] = self.time_prefill(length)
            gc.collect()
        if TTFT_PROMPT not in plan["lengths"]:
            out["first_token"][str(TTFT_PROMPT)] = self.time_prefill(TTFT_PROMPT)[1]
        self._phase_done("prefill")
        out["decode"] = self.time_decode(plan["batch"], plan["decode_steps"])
        gc.collect()
        self._phase_done("decode")
        out["gemv"] = self.time_weights_gemv()
        if plan["batched"]:
            out["batched_decode"] = self.time_decode(plan["batched"], plan["decode_steps"])
            gc.collect()
            self._phase_done("batched_decode")
        return out

    def close(self) -> dict[str, Any]:
        """Peak RSS per phase; `peak_rss_bytes` over the whole run, `batch1_peak_rss_bytes` without the
        warm-up and the batched decode."""
        self._phase_done("close")
        peaks = self.phase_peaks
        batch1 = [peaks[k] for k in ("import", "build", "prefill", "decode") if k in peaks]
        return {"peak_rss_bytes": max(peaks.values()), "batch1_peak_rss_bytes": max(batch1), "phases": peaks}


# ---- worker processes ----------------------------------------------------------------------------


def _worker_main(args: argparse.Namespace) -> int:
    """Serve one implementation: 'ready' after the build, one line per {"cmd": "repeat"}, 'done' on exit."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stdout carries only the protocol; anything else printed goes to stderr

    def send(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")

    try:
        if args.worker == "load":
            send({"event": "done", **_load_once(args.dir, args.dtype)})
            return 0
        runner = Runner(args.worker, Zamba2Config.preset(args.arch), DTYPES[args.dtype], _plan(args))
        send({"event": "ready", "info": runner.info})
        for line in sys.stdin:
            cmd = json.loads(line)["cmd"]
            if cmd == "repeat":
                send({"event": "repeat", "data": runner.repeat()})
            elif cmd == "exit":
                send({"event": "done", "memory": runner.close()})
                return 0
        return 0
    except Exception as err:  # reported to the parent, which names the worker
        traceback.print_exc()
        send({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 1


def _load_once(folder: str, dtype: str) -> dict[str, Any]:
    """Time from_pretrained in this (fresh) process; peak RSS over the run and after the imports."""
    from zamba2.model import Zamba2ForCausalLM

    import_rss = peak_rss_bytes()
    start = time.perf_counter()
    Zamba2ForCausalLM.from_pretrained(folder, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], progress=False)
    return {
        "load_s": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
        "import_rss_bytes": import_rss,
    }


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so `-m zamba2.bench` finds this copy of the package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class WorkerProcess:
    """The parent's handle on a worker: the same `info` / `repeat()` / `close()` as a Runner."""

    def __init__(self, impl: str, argv: list[str]) -> None:
        self.impl = impl
        cmd = [sys.executable, "-m", "zamba2.bench", "--worker", impl, *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env())
        self.info = self._receive("ready")["info"]

    def _receive(self, event: str) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.impl} worker exited with code {code} (its error is printed above)")
        msg = json.loads(line)
        if msg["event"] == "error":
            self.proc.wait()
            raise RuntimeError(f"the {self.impl} worker failed: {msg['message']}")
        if msg["event"] != event:
            raise RuntimeError(f"the {self.impl} worker sent {msg['event']!r}, expected {event!r}")
        return msg

    def _send(self, cmd: str) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()

    def repeat(self) -> dict[str, Any]:
        self._send("repeat")
        return self._receive("repeat")["data"]

    def close(self) -> dict[str, Any]:
        self._send("exit")
        memory = self._receive("done")["memory"]
        self.proc.wait()
        return memory

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("lengths", "decode_steps", "batch", "batched", "quantize", "seed", "compile")
    return {k: getattr(args, k) for k in keys}


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--arch", args.arch, "--dtype", args.dtype, "--lengths", ",".join(map(str, args.lengths)),
        "--decode-steps", str(args.decode_steps), "--batch", str(args.batch), "--batched", str(args.batched),
        "--threads", str(torch.get_num_threads()), "--seed", str(args.seed),
    ]  # fmt: skip
    return argv + (["--quantize", args.quantize] if args.quantize else []) + (["--compile"] if args.compile else [])


# ---- the run -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, impls: list[str]) -> dict[str, dict[str, Any]]:
    """Build each implementation (in a worker, or here), run the repeats in ABBA order, collect results."""
    config, dtype = Zamba2Config.preset(args.arch), DTYPES[args.dtype]
    handles: dict[str, Any] = {}
    try:
        for impl in impls:
            print(f"building {impl} ({args.arch}, {args.dtype}) ...", file=sys.stderr, flush=True)
            if args.no_subprocess:
                handles[impl] = Runner(impl, config, dtype, _plan(args))
            else:
                handles[impl] = WorkerProcess(impl, _worker_argv(args))
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                print(f"repeat {r + 1}/{args.repeats}: {impl} ...", file=sys.stderr, flush=True)
                runs[impl].append(handles[impl].repeat())
        results = {}
        for impl in impls:
            memory = handles[impl].close()
            results[impl] = {"info": handles[impl].info, "runs": runs[impl], "memory": memory}
        return results
    finally:
        for handle in handles.values():
            if isinstance(handle, WorkerProcess):
                handle.kill()


def summarise(
    impl_results: dict[str, Any],
    args: argparse.Namespace,
    bandwidth: dict[str, Any] | None,
    shared_process: bool,
) -> dict[str, Any]:
    """Best-of-repeats figures for one implementation, with every run's seconds kept under "runs"."""
    info, runs, memory = impl_results["info"], impl_results["runs"], impl_results["memory"]

    def best(get) -> dict[str, Any]:
        seconds = [get(run) for run in runs]
        return {"seconds": min(seconds), "runs": seconds}

    prefill = {}
    for length in args.lengths:
        entry = best(lambda run, n=str(length): run["prefill"][n])
        prefill[str(length)] = {"tokens": length, **entry, "tokens_per_s": length / entry["seconds"]}
    ttft = {"prompt": TTFT_PROMPT, **best(lambda run: run["first_token"][str(TTFT_PROMPT)])}
    # decode's bound in tokens/s at batch 1
    bound = None if bandwidth is None else bandwidth["gb_per_s"] * GB / info["streamed_bytes"]
    decodes = {}
    for name, batch in (("decode", args.batch), ("batched_decode", args.batched)):
        if not batch:
            continue
        entry = best(lambda run, n=name: run[n])
        tps = batch * args.decode_steps / entry["seconds"]
        decodes[name] = {
            "batch": batch,
            "prompt": DECODE_PROMPT,
            "steps": args.decode_steps,
            **entry,
            "tokens_per_s": tps,
        }
        if bound is not None:
            # Weights are streamed once per step whatever the batch: the bound grows with it.
            decodes[name]["bound_tokens_per_s"] = bound * batch
            decodes[name]["bound_fraction"] = tps / (bound * batch)
            # the same against the bytes a step really streams (shared blocks read again at each use)
            reread_bound = bandwidth["gb_per_s"] * GB / (info["streamed_bytes"] + info["reread_bytes"])
            decodes[name]["streamed_bound_fraction"] = tps / (reread_bound * batch)
    if "batched_decode" in decodes:
        batched, single = decodes["batched_decode"], decodes["decode"]
        batched["vs_decode"] = batched["tokens_per_s"] / single["tokens_per_s"]
    peak, weights = memory["peak_rss_bytes"], info["weight_bytes"]
    return {
        "model": {k: info[k] for k in ("params", "weight_bytes", "streamed_bytes", "reread_bytes", "build_s",
                                       "quantize")},  # fmt: skip
        "prefill": prefill,
        "ttft": ttft,
        **decodes,
        "memory": {
            "peak_rss_bytes": peak, "batch1_peak_rss_bytes": memory["batch1_peak_rss_bytes"],
            "import_rss_bytes": memory["phases"]["import"], "phase_peak_rss_bytes": memory["phases"],
            "weight_bytes": weights, "over_weights_bytes": peak - weights,
            "batch1_over_weights_bytes": memory["batch1_peak_rss_bytes"] - weights,
            "shared_process": shared_process,
        },
    }  # fmt: skip


def combine_bandwidth(first: dict[str, Any], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best GB/s over the buffer measured before the run and every repeat's GEMV over model weights:
    contention on a shared machine only ever lowers a sample."""
    samples = [{"where": "buffer, before the run", "gb_per_s": first["gb_per_s"]}]
    for impl, res in raw.items():
        for r, run in enumerate(res["runs"]):
            if run.get("gemv"):
                size, seconds = run["gemv"]
                samples.append({"where": f"{impl} weights, repeat {r + 1}", "gb_per_s": size / seconds / GB})
    return {**first, "gb_per_s": max(s["gb_per_s"] for s in samples), "samples": samples}


def speedups(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """ours / ref for throughputs, ref / ours for times (so > 1 means ours is faster), ours / ref for RSS."""
    out: dict[str, Any] = {
        "prefill": {n: v["tokens_per_s"] / ref["prefill"][n]["tokens_per_s"] for n, v in ours["prefill"].items()},
        "ttft": ref["ttft"]["seconds"] / ours["ttft"]["seconds"],
    }
    for name in ("decode", "batched_decode"):
        if name in ours:
            out[name] = ours[name]["tokens_per_s"] / ref[name]["tokens_per_s"]
    for key in ("peak_rss_bytes", "batch1_peak_rss_bytes"):
        out[key.replace("_bytes", "_ratio")] = ours["memory"][key] / ref["memory"][key]
    return out


def measure_load(args: argparse.Namespace) -> dict[str, Any]:
    """Write a random checkpoint with save_pretrained; time from_pretrained in a fresh process (warm page
    cache: the files were just written)."""
    if importlib.util.find_spec("zamba2.checkpoint") is None:
        return {"skipped": "zamba2.checkpoint is not available"}
    from zamba2 import checkpoint

    if not (hasattr(checkpoint, "save_pretrained") and hasattr(checkpoint, "load_pretrained")):
        return {"skipped": "zamba2.checkpoint has no save_pretrained / load_pretrained yet"}
    with tempfile.TemporaryDirectory(prefix="zamba2-bench-") as tmp:
        model = build_ours(Zamba2Config.preset(args.arch), DTYPES[args.dtype], args.seed)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        weights = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        argv = ["--dir", tmp, "--dtype", args.dtype, "--threads", str(torch.get_num_threads())]
        if args.no_subprocess:
            # tests: same code path, but the RSS is this process's (meaningless as a figure)
            result = _load_once(tmp, args.dtype)
        else:
            cmd = [sys.executable, "-m", "zamba2.bench", "--worker", "load", *argv]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_worker_env())
            lines = done.stdout.strip().splitlines()
            msg = json.loads(lines[-1]) if lines else {"event": "error", "message": f"exit code {done.returncode}"}
            if msg["event"] == "error":
                raise RuntimeError(f"the load worker failed: {msg['message']}")
            result = {k: v for k, v in msg.items() if k != "event"}
    target = 1.3 * weights + 300e6  # the whole process's peak, interpreter and torch included
    peak = result["peak_rss_bytes"]
    return {
        "arch": args.arch, "dtype": args.dtype, "weights_bytes": weights, **result,
        "rss_over_weights": peak / weights,
        "rss_over_weights_after_import": (peak - result["import_rss_bytes"]) / weights,
        "target_bytes": target, "within_target": peak < target, "shared_process": args.no_subprocess,
    }  # fmt: skip


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ref_version = None
    if importlib.util.find_spec("transformers") is not None:
        from importlib.metadata import version

        ref_version = version("transformers")  # the version only: importing transformers is the workers' job
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": ref_version,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


# ---- report --------------------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def format_table(report: dict[str, Any]) -> str:
    ours, ref = report["results"].get("ours"), report["results"].get("ref")
    ratio = report.get("speedup", {})
    m, a = report["machine"], report["args"]
    lines = [
        f"zamba2 bench: {a['arch']} {a['dtype']}"
        + (f" ({a['quantize']}, ours only)" if a["quantize"] else "")
        + f", best of {a['repeats']}; {m['cpu']}, {m['cores_available']} cores, threads={m['threads']}, "
        f"torch {m['torch']}" + (f", transformers {m['transformers']}" if ref else "")
        + (f"; load average {m['load_average'][0]:.1f}" if m.get("load_average") else ""),
        f"{'':38}{'ours':>12}{'ref':>12}{'speedup':>10}",
    ]  # fmt: skip

    def row(label: str, get, fmt: str = "{:.1f}", r: float | None = None) -> None:
        cells = []
        for res in (ours, ref):
            value = get(res) if res is not None else None
            cells.append(f"{fmt.format(value) if value is not None else '-':>12}")
        lines.append(f"{label:38}{''.join(cells)}{(f'{r:.2f}x' if r is not None else ''):>10}")

    for n in a["lengths"]:
        row(
            f"prefill {n} (tok/s)",
            lambda res, n=str(n): res["prefill"][n]["tokens_per_s"],
            r=ratio.get("prefill", {}).get(str(n)),
        )
    row(
        f"time to first token, {TTFT_PROMPT} (s)",
        lambda res: res["ttft"]["seconds"],
        "{:.3f}",
        ratio.get("ttft"),
    )
    any_res = ours or ref
    for name in ("decode", "batched_decode"):
        if name in any_res:
            b = any_res[name]["batch"]
            row(
                f"decode batch {b} (tok/s{', total' if b > 1 else ''})",
                lambda res, k=name: res[k]["tokens_per_s"],
                r=ratio.get(name),
            )
    if "batched_decode" in any_res:
        row(
            f"decode batch {a['batched']} / batch {a['batch']}",
            lambda res: res["batched_decode"]["vs_decode"],
            "{:.2f}x",
        )
    if "bound_fraction" in any_res.get("decode", {}):
        row("decode / bandwidth bound", lambda res: 100 * res["decode"]["bound_fraction"], "{:.0f}%")
        row("  / bound with shared re-reads", lambda res: 100 * res["decode"]["streamed_bound_fraction"], "{:.0f}%")
    row("weights (GB)", lambda res: res["memory"]["weight_bytes"] / GB, "{:.2f}")
    row("RSS after imports (GB)", lambda res: res["memory"]["import_rss_bytes"] / GB, "{:.2f}")
    for label, key in (("batch-1 work", "batch1_peak_rss"), ("whole run", "peak_rss")):
        row(
            f"peak RSS, {label} (GB; ours/ref)",
            lambda res, k=key: res["memory"][f"{k}_bytes"] / GB,
            "{:.2f}",
            ratio.get(f"{key}_ratio"),
        )
        row(
            "  = weights + (GB)",
            lambda res, k=key: res["memory"][f"{k}_bytes"] / GB - res["memory"]["weight_bytes"] / GB,
            "{:.2f}",
        )
    row("build (s)", lambda res: res["model"]["build_s"], "{:.1f}")
    if any_res["memory"]["shared_process"]:
        lines.append("(--no-subprocess: both implementations shared one process; RSS is not per implementation)")
    bw = report.get("bandwidth")
    if bw:
        streamed = (ours or ref)["model"]["streamed_bytes"]
        lines.append(
            f"bandwidth: {bw['gb_per_s']:.1f} GB/s (best of {len(bw['samples'])} batch-1 GEMV samples: a "
            f"{_size(bw['buffer_bytes'])} buffer, then the models' own weights in each repeat); "
            f"decode bound {bw['gb_per_s'] * GB / streamed:.1f} tok/s at {_size(streamed)} per token"
        )
    load = report.get("load")
    if load:
        if "skipped" in load:
            lines.append(f"load: skipped, {load['skipped']}")
        else:
            verdict = "within" if load["within_target"] else "OVER"
            lines.append(
                f"load: {load['load_s']:.2f} s, peak RSS {_size(load['peak_rss_bytes'])} for "
                f"{_size(load['weights_bytes'])} of weights ({load['rss_over_weights']:.2f}x, "
                f"{load['rss_over_weights_after_import']:.2f}x above the {_size(load['import_rss_bytes'])} "
                f"after imports); {verdict} the target 1.3 x weights + 0.3 GB = {_size(load['target_bytes'])}"
            )
    unquantised, vs = report["results"].get("float"), report.get("vs_float")
    if unquantised and vs:
        decodes = [k for k in ("decode", "batched_decode") if k in unquantised]
        lines.append(
            f"ours unquantised ({a['dtype']}), same run: prefill "
            + " / ".join(f"{unquantised['prefill'][str(n)]['tokens_per_s']:.1f}" for n in a["lengths"])
            + " tok/s; decode "
            + ", ".join(f"batch {unquantised[k]['batch']} {unquantised[k]['tokens_per_s']:.1f} tok/s" for k in decodes)
        )
        lines.append(
            f"{a['quantize']} / unquantised: prefill "
            + " / ".join(f"{vs['prefill'][str(n)]:.2f}x" for n in a["lengths"])
            + "; decode "
            + ", ".join(f"batch {unquantised[k]['batch']} {vs[k]:.2f}x" for k in decodes)
        )
    lines += report["notes"]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> str | None:
    """Prefill tokens/s vs prompt length (log x) and decode bars; returns an error message, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install 'zamba2[bench]' (or matplotlib)"
    results, a, m = report["results"], report["args"], report["machine"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, res in results.items():
        lengths = sorted(int(n) for n in res["prefill"])
        left.plot(lengths, [res["prefill"][str(n)]["tokens_per_s"] for n in lengths], marker="o", label=impl)
    left.set_xscale("log", base=2)
    left.set_xticks(a["lengths"], [str(n) for n in a["lengths"]])
    left.minorticks_off()
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel("prefill tokens/s")
    left.legend()
    left.grid(True, alpha=0.3)
    kinds = [k for k in ("decode", "batched_decode") if k in next(iter(results.values()))]
    width = 0.8 / len(results)
    for i, (impl, res) in enumerate(results.items()):
        xs = [k + i * width for k in range(len(kinds))]
        right.bar(xs, [res[k]["tokens_per_s"] for k in kinds], width, label=impl)
    right.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(kinds))])
    right.set_xticklabels([f"batch {next(iter(results.values()))[k]['batch']}" for k in kinds])
    right.set_ylabel("decode tokens/s (all rows)")
    right.legend()
    fig.suptitle(f"zamba2 {a['arch']} {a['dtype']} on {m['cpu']}, threads={m['threads']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- command line --------------------------------------------------------------------------------


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive token counts like 128,512,2048; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zamba2 bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="1.2b", choices=["tiny", "1.2b", "2.7b", "7b"], help="Zamba2Config.preset")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--lengths", type=_lengths, default=[128, 512, 2048], help="prefill prompt lengths (128,512,2048)")
    p.add_argument("--long", action="store_true", help=f"also prefill {LONG_PROMPT} tokens")
    p.add_argument("--decode-steps", type=int, default=64, help="one-token steps timed after a 128-token prompt")
    p.add_argument("--batch", type=int, default=1, help="rows of the main decode measurement")
    p.add_argument("--batched", type=int, default=8, help="rows of the batched decode measurement (0: skip)")
    p.add_argument("--compare", action="store_true", help="also measure transformers (the reference)")
    p.add_argument("--only", choices=["ours", "ref"], help="measure one implementation only")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every measurement; the best counts")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--json", help="where to write the results (bench-results/bench-<arch>-<dtype>.json)")
    p.add_argument("--plot", help="also draw the results to this .png (needs matplotlib)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantise our model with zamba2.quant")
    p.add_argument("--vs-float", action="store_true",
                   help="with --quantize: also measure our unquantised model in the same run, and the ratios")
    p.add_argument("--compile", action="store_true", help="torch.compile our mixer decode step (zamba2.ops.compiled)")
    p.add_argument("--quality", type=int, nargs="?", const=320, metavar="POSITIONS",
                   help="only report quantisation error: int8/int4 vs bf16, bf16 vs fp32, over POSITIONS (320)")
    p.add_argument("--load", action="store_true", help="also time from_pretrained of a random checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--no-subprocess", action="store_true", help="measure in this process (fast; RSS shared)")
    p.add_argument("--worker", choices=["ours", "float", "ref", "load"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--decode-steps", args.decode_steps, 1), ("--batch", args.batch, 1),
                             ("--batched", args.batched, 0), ("--repeats", args.repeats, 1)):  # fmt: skip
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.long and LONG_PROMPT not in args.lengths:
        args.lengths = [*args.lengths, LONG_PROMPT]
    if args.worker is not None:
        return _worker_main(args)
    if args.quality:
        figures = quality(Zamba2Config.preset(args.arch), args.quality, args.seed)
        print(f"quantisation quality, {args.arch} random weights, {args.quality} positions")
        for name, f in figures.items():
            print(f"  {name:14} relative logit error {f['relative_logit_error']:.4f}   "
                  f"top-1 agreement {100 * f['top1_agreement']:.1f}%")  # fmt: skip
        path = Path(args.json or f"bench-results/quality-{args.arch}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"arch": args.arch, "positions": args.quality, "results": figures}, indent=2))
        print(f"results written to {path}")
        return 0

    notes: list[str] = []
    want_ref = args.compare or args.only == "ref"
    impls = ["ours", "ref"] if want_ref and args.only is None else [args.only or "ours"]
    if "ref" in impls and importlib.util.find_spec("transformers") is None:
        message = "transformers is not importable, so the reference is not measured (pip install transformers)"
        print(message, file=sys.stderr)
        notes.append(message)
        impls.remove("ref")
        if not impls:
            return 1
    if args.quantize and "ref" in impls:
        notes.append(f"--quantize {args.quantize} applies to ours only; the reference runs in {args.dtype}")
    if args.vs_float:
        if not args.quantize:
            parser.error("--vs-float compares a quantised model with the unquantised one: add --quantize")
        if "ours" in impls:
            impls.insert(1, "float")  # ours unquantised, alternated with the others like any implementation

    config, dtype = Zamba2Config.preset(args.arch), DTYPES[args.dtype]
    print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
    bandwidth = measure_bandwidth(linear_weight_bytes(config, dtype), dtype)
    gc.collect()
    machine = machine_info()  # the load average before the run: others' work on a shared machine shows here
    try:
        raw = measure(args, impls)
    except RuntimeError as err:
        print(f"zamba2 bench: {err}", file=sys.stderr)
        return 1
    bandwidth = combine_bandwidth(bandwidth, raw)
    results = {impl: summarise(raw[impl], args, bandwidth, args.no_subprocess) for impl in impls}
    info = raw["ours"]["info"] if "ours" in raw else None
    if info and info["quantize"] and "skipped" in info["quantize"]:
        notes.append(f"--quantize {args.quantize}: skipped, {info['quantize']['skipped']}")
    report: dict[str, Any] = {
        "schema": 1,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "dir")},
        "machine": machine,
        "config": config.to_dict(),
        "bandwidth": bandwidth,
        "results": results,
    }
    if "ours" in results and "ref" in results:
        report["speedup"] = speedups(results["ours"], results["ref"])
    if "ours" in results and "float" in results:
        report["vs_float"] = speedups(results["ours"], results["float"])
    if args.load:
        print("measuring checkpoint load ...", file=sys.stderr, flush=True)
        try:
            report["load"] = measure_load(args)
        except Exception as err:  # another module's failure: keep the measurements already made
            traceback.print_exc()
            report["load"] = {"skipped": f"failed: {type(err).__name__}: {err}"}
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    report["notes"] = notes

    path = Path(args.json or f"bench-results/bench-{args.arch}-{args.dtype}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"results written to {path}")
    if args.plot:
        error = plot(report, args.plot)
        print(error if error else f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
