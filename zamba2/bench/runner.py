"""One implementation's timed calls (`Runner`), and the worker subprocess that runs one with its own RSS."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zamba2.bench.memory import peak_rss_bytes, reread_bytes, reset_peak_rss, streamed_bytes, weight_bytes
from zamba2.bench.models import DTYPES, build_ours, build_reference
from zamba2.config import Zamba2Config

TTFT_PROMPT = 512  # tokens before the first-token timing
DECODE_PROMPT = 128  # tokens before the decode timing


# ---- one implementation's measurements -----------------------------------------------------------


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


def worker_main(args: argparse.Namespace) -> int:
    """Serve one implementation: 'ready' after the build, one line per {"cmd": "repeat"}, 'done' on exit."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stdout carries only the protocol; anything else printed goes to stderr

    def send(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")

    try:
        if args.worker == "load":
            send({"event": "done", **load_once(args.dir, args.dtype)})
            return 0
        runner = Runner(args.worker, Zamba2Config.preset(args.arch), DTYPES[args.dtype], runner_plan(args))
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


def load_once(folder: str, dtype: str) -> dict[str, Any]:
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


def worker_env() -> dict[str, str]:
    """This environment, with the folder holding this copy of `zamba2` first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so `-m zamba2.bench` finds this copy of the package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class WorkerProcess:
    """The parent's handle on a worker: the same `info` / `repeat()` / `close()` as a Runner."""

    def __init__(self, impl: str, argv: list[str]) -> None:
        self.impl = impl
        cmd = [sys.executable, "-m", "zamba2.bench", "--worker", impl, *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env())
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


def runner_plan(args: argparse.Namespace) -> dict[str, Any]:
    """What a Runner measures, from the command line."""
    keys = ("lengths", "decode_steps", "batch", "batched", "quantize", "seed", "compile")
    return {k: getattr(args, k) for k in keys}


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The flags a worker needs to build the same model and measure the same things."""
    argv = [
        "--arch", args.arch, "--dtype", args.dtype, "--lengths", ",".join(map(str, args.lengths)),
        "--decode-steps", str(args.decode_steps), "--batch", str(args.batch), "--batched", str(args.batched),
        "--threads", str(torch.get_num_threads()), "--seed", str(args.seed),
    ]  # fmt: skip
    return argv + (["--quantize", args.quantize] if args.quantize else []) + (["--compile"] if args.compile else [])
