"""Training benchmark: forward + backward tokens/s and peak RSS, ours against transformers 5.23, in one run.

    python -m zamba2.bench.train                   # 6-layer slice of the 1.2B architecture, 512 tokens, batch 1
    python -m zamba2.bench.train --lora 16         # LoRA rank 16 on the full 1.2B architecture, ours only

Each implementation runs in its own worker process (as in `zamba2 bench`), so each peak RSS is its own; the
rounds alternate (ours, ref, ref, ours, ...) and the best round counts. One round of a worker is one training
step on fixed random ids, labels = ids: the forward (ours with `loss_only=True`, the fused lm_head + cross
entropy), the backward, then the optimizer step, timed apart. The precision of each side (`--precision`,
`--ref-precision`): `autocast` (fp32 weights under bf16 autocast, torch's AdamW on them; the reference's
default, as the issue defines it) or `bf16` (bf16 weights, fp32 masters in the step: zamba2/train/precision.py;
the step then holds the grads -> fp32 and masters -> bf16 casts that autocast does in forward and backward, so
the whole step is reported too). `--optimizer-in-backward` steps each parameter inside the backward (ours).

Also measured, in the ours worker every round: the GEMM floor, the time of the bf16 matrix products of the same
shapes alone (forward, and in backward the input gradient and, for trainable weights, the weight gradient of
every linear call, lm_head included). The step cannot be faster than that on this machine. An `adamw` worker
times torch's AdamW step over tensors of the model's trainable shapes in its three CPU implementations (fused,
foreach, for-loop), alternating, so the training loop can use the fastest.

With `--lora R` our model is the full architecture in bf16 (frozen) with LoRA adapters of rank R on the default
targets (zamba2/train/lora.py, fp32 factors); the step time and the peak RSS are reported against the bf16
weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zamba2 import allocator
from zamba2.bench.memory import GB, peak_rss_bytes, reset_peak_rss, weight_bytes
from zamba2.bench.models import build_ours, build_reference
from zamba2.bench.runner import WorkerProcess, prompt, worker_env
from zamba2.config import Zamba2Config
from zamba2.ops import gemm
from zamba2.train.precision import MixedPrecisionAdamW

OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def slice_config(layers: int, arch: str = "1.2b") -> Zamba2Config:
    """An architecture cut to its first `layers` layers, the last one hybrid (1.2B's first hybrid is layer 5)."""
    kinds = ["mamba"] * (layers - 1) + ["hybrid"]
    return Zamba2Config.preset(arch, num_hidden_layers=layers, layers_block_type=kinds, num_mem_blocks=1)


def bench_config(args: argparse.Namespace) -> Zamba2Config:
    return Zamba2Config.preset(args.arch) if args.lora else slice_config(args.layers, args.arch)


# ---- the GEMM floor --------------------------------------------------------------------------------


def linear_calls(model: nn.Module, ids: torch.Tensor) -> list[tuple[int, int, int, bool]]:
    """(rows, in, out, weight trainable) of every nn.Linear call of one forward of our model (whole q/k/v
    projections, as the architecture defines them), lm_head included."""
    from zamba2.layers.attention import SharedAttention

    calls: list[tuple[int, int, int, bool]] = []

    def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        calls.append((x.numel() // x.shape[-1], module.in_features, module.out_features, module.weight.requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    previous = SharedAttention.split_projections
    SharedAttention.split_projections = False
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, use_cache=False)
    finally:
        SharedAttention.split_projections = previous
        for h in handles:
            h.remove()
    return calls


def gemm_floor(calls: list[tuple[int, int, int, bool]], dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Seconds and FLOPs of the forward and backward products of `calls` alone, on constant bf16 operands. On a
    CPU without bf16 GEMM kernels (zamba2/ops/gemm.py: there torch's bf16 loops run at 0.16-10 GFLOP/s) the
    fastest way to these products is fp32 arithmetic on the exact upcasts, so the floor times fp32 products
    (without the upcasts themselves)."""
    if not gemm.has_native_kernels(dtype):
        dtype = torch.float32
    seconds = flops = 0.0
    for rows, k, n, trainable in calls:
        x, w = torch.full((rows, k), 0.01, dtype=dtype), torch.full((n, k), 0.01, dtype=dtype)
        dy = torch.full((rows, n), 0.01, dtype=dtype)
        F.linear(x, w)  # touch the pages first
        start = time.perf_counter()
        F.linear(x, w)  # forward: y = x W^T
        torch.mm(dy, w)  # input gradient
        if trainable:
            torch.mm(dy.t(), x)  # weight gradient
        seconds += time.perf_counter() - start
        flops += 2 * rows * k * n * (3 if trainable else 2)
    return {"seconds": seconds, "flops": flops}


# ---- one implementation's worker ---------------------------------------------------------------------


class TrainRunner:
    def __init__(self, impl: str, args: argparse.Namespace) -> None:
        self.impl, self.args = impl, args
        if impl == "ref":
            import transformers.models.zamba2.modeling_zamba2  # noqa: F401  (counted in the import RSS)
        else:
            import zamba2.model  # noqa: F401
        self.peaks: dict[str, int] = {"import": peak_rss_bytes()}
        reset_peak_rss()
        config = self.config = bench_config(args)
        self.precision = args.ref_precision if impl == "ref" else args.precision
        if args.lora:  # frozen bf16 base, fp32 factors (bf16 ones with fp32 masters under --precision bf16)
            from zamba2.train.lora import add_lora

            self.model = build_ours(config, torch.bfloat16, args.seed)
            add_lora(self.model, rank=args.lora, alpha=2 * args.lora)
        else:
            build = build_reference if impl == "ref" else build_ours
            self.model = build(config, torch.float32, args.seed)
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.model.train()
        if args.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        params = [p for p in {id(p): p for p in self.model.parameters()}.values() if p.requires_grad]
        in_backward = args.optimizer_in_backward and impl == "ours"
        self.mixed = None
        if self.precision == "bf16" or in_backward:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.mixed = MixedPrecisionAdamW(self.model, [{"params": params}], dtype, in_backward, lr=1e-5,
                                             **OPTIMIZERS[args.adamw])  # fmt: skip
            self.optimizer = self.mixed
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, **OPTIMIZERS[args.adamw])
        self.ids = prompt(args.batch, args.tokens, config.vocab_size)
        self.calls = linear_calls(self.model, self.ids) if impl == "ours" else []
        gc.collect()
        self.info = {
            "impl": impl,
            "weight_bytes": weight_bytes(self.model),
            "trainable": sum(p.numel() for p in params),
            "master_bytes": 4 * sum(m.numel() for m in self.mixed.masters) if self.mixed is not None else 0,
            "gemm_route": "bf16" if gemm.has_native_kernels(torch.bfloat16) else "fp32 (no bf16 GEMM kernels here)",
            "gemm_flops": sum(2 * r * k * n * (3 if t else 2) for r, k, n, t in self.calls),
        }
        self._phase("build")
        if not (impl == "ref" and args.no_ref_warmup):
            self.repeat()  # warm-up: first-touch pages, oneDNN kernels, the optimizer's moments; not reported

    def _phase(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0), peak_rss_bytes())
        reset_peak_rss()

    def _loss(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "autocast"):
            if self.impl == "ref":
                return self.model(self.ids, labels=self.ids, use_cache=False).loss
            return self.model(self.ids, labels=self.ids, use_cache=False, loss_only=True).loss

    def repeat(self) -> dict[str, Any]:
        start = time.perf_counter()
        loss = self._loss()
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        self._phase("forward_backward")
        self.optimizer.step()  # in-backward: done inside the backward
        self.optimizer.zero_grad()
        step_end = time.perf_counter()
        del loss
        gc.collect()
        self._phase("optimizer")
        out = {"forward": mid - start, "backward": end - mid, "optimizer": step_end - end}
        if self.calls:
            out["gemm"] = gemm_floor(self.calls)["seconds"]
            gc.collect()
            self._phase("gemm")
        return out

    def close(self) -> dict[str, Any]:
        self._phase("close")
        train = [self.peaks[k] for k in ("import", "build", "forward_backward", "optimizer") if k in self.peaks]
        return {"peak_rss_bytes": max(train), "phases": self.peaks}


class AdamWRunner:
    """torch's AdamW step in each CPU implementation over tensors of the model's trainable shapes."""

    def __init__(self, args: argparse.Namespace) -> None:
        with torch.device("meta"):
            from zamba2.model import Zamba2ForCausalLM

            model = Zamba2ForCausalLM(bench_config(args))
            if args.lora:  # the adapters' shapes (on meta: no memory)
                from zamba2.train.lora import add_lora

                add_lora(model, rank=args.lora, alpha=2 * args.lora)
        shapes = [p.shape for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        self.params = [torch.full(s, 0.01, requires_grad=True) for s in shapes]
        for p in self.params:
            p.grad = torch.full_like(p, 1e-3)
        self.info = {"impl": "adamw", "params": sum(p.numel() for p in self.params)}
        self.round = 0

    def repeat(self) -> dict[str, Any]:
        kinds = list(OPTIMIZERS) if self.round % 2 == 0 else list(reversed(OPTIMIZERS))
        self.round += 1
        out = {}
        for kind in kinds:
            opt = torch.optim.AdamW(self.params, lr=1e-5, **OPTIMIZERS[kind])
            opt.step()  # allocates the moments
            start = time.perf_counter()
            opt.step()
            out[kind] = time.perf_counter() - start
            del opt
            gc.collect()
        return out

    def close(self) -> dict[str, Any]:
        return {}


def worker_main(args: argparse.Namespace) -> int:
    """The protocol of zamba2.bench.runner: 'ready', one line per {"cmd": "repeat"}, 'done' on exit."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")

    try:
        runner = AdamWRunner(args) if args.worker == "adamw" else TrainRunner(args.worker, args)
        send({"event": "ready", "info": runner.info})
        for line in sys.stdin:
            cmd = json.loads(line)["cmd"]
            if cmd == "repeat":
                send({"event": "repeat", "data": runner.repeat()})
            elif cmd == "exit":
                send({"event": "done", "memory": runner.close()})
                return 0
        return 0
    except Exception as err:
        import traceback

        traceback.print_exc()
        send({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 1


class TrainWorker(WorkerProcess):
    def __init__(self, impl: str, argv: list[str]) -> None:
        self.impl = impl
        cmd = [sys.executable, "-m", "zamba2.bench.train", "--worker", impl, *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env())
        self.info = self._receive("ready")["info"]


# ---- the run -------------------------------------------------------------------------------------


def _argv(args: argparse.Namespace) -> list[str]:
    argv = ["--arch", args.arch, "--layers", str(args.layers), "--tokens", str(args.tokens), "--batch", str(args.batch),
            "--seed", str(args.seed), "--adamw", args.adamw, "--threads", str(torch.get_num_threads())]  # fmt: skip
    argv += ["--grad-checkpointing"] if args.grad_checkpointing else []
    argv += ["--precision", args.precision, "--ref-precision", args.ref_precision]
    argv += ["--optimizer-in-backward"] if args.optimizer_in_backward else []
    argv += ["--no-ref-warmup"] if args.no_ref_warmup else []
    return argv + (["--lora", str(args.lora)] if args.lora else [])


def _rounds(impls: list[str], args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """Start a worker per implementation, alternate their rounds (ABBA), then close them; results into `raw`."""
    workers: dict[str, TrainWorker] = {}
    try:
        for impl in impls:
            print(f"building {impl} ...", file=sys.stderr, flush=True)
            workers[impl] = TrainWorker(impl, _argv(args))
            raw["info"][impl] = workers[impl].info
            raw["rounds"][impl] = []
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else list(reversed(impls)):
                data = workers[impl].repeat()
                raw["rounds"][impl].append(data)
                print(f"round {r + 1} {impl}: " + ", ".join(f"{k} {v:.2f} s" for k, v in data.items()),
                      file=sys.stderr, flush=True)  # fmt: skip
        for impl in impls:
            raw["memory"][impl] = workers.pop(impl).close()
    finally:
        for w in workers.values():
            w.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    impls = ["ours"] if args.lora or args.only == "ours" else ["ours", "ref"] if args.only is None else [args.only]
    raw: dict[str, Any] = {"rounds": {}, "info": {}, "memory": {}}
    _rounds(impls, args, raw)
    if not args.no_adamw:  # afterwards: beside two training states it could run out of memory
        try:
            _rounds(["adamw"], args, raw)
        except RuntimeError as err:  # the training figures stand without it
            print(f"zamba2 bench train: AdamW comparison skipped: {err}", file=sys.stderr)
            raw["rounds"].pop("adamw", None)
    return raw


def summarise(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    tokens = args.batch * args.tokens
    out: dict[str, Any] = {}
    for impl, rounds in raw["rounds"].items():
        if impl == "adamw":
            out[impl] = {kind: min(r[kind] for r in rounds) for kind in OPTIMIZERS}
            continue
        best = min(rounds, key=lambda r: r["forward"] + r["backward"])
        s = {
            "forward_s": best["forward"],
            "backward_s": best["backward"],
            "forward_backward_s": best["forward"] + best["backward"],
            "forward_backward_range_s": [
                min(r["forward"] + r["backward"] for r in rounds),
                max(r["forward"] + r["backward"] for r in rounds),
            ],  # fmt: skip
            "tokens_per_s": tokens / (best["forward"] + best["backward"]),
            "optimizer_s": min(r["optimizer"] for r in rounds),
            "step_s": min(r["forward"] + r["backward"] + r["optimizer"] for r in rounds),
            "peak_rss_bytes": raw["memory"][impl]["peak_rss_bytes"],
            "weight_bytes": raw["info"][impl]["weight_bytes"],
            "trainable": raw["info"][impl]["trainable"],
        }
        if "gemm" in rounds[0]:
            s["gemm_floor_s"] = min(r["gemm"] for r in rounds)
            s["gemm_flops"] = raw["info"][impl]["gemm_flops"]
            s["vs_gemm_floor"] = s["forward_backward_s"] / s["gemm_floor_s"]
        out[impl] = s
    if "ours" in out and "ref" in out:
        out["speedup"] = out["ref"]["forward_backward_s"] / out["ours"]["forward_backward_s"]
        out["step_speedup"] = out["ref"]["step_s"] / out["ours"]["step_s"]
        out["rss_ratio"] = out["ours"]["peak_rss_bytes"] / out["ref"]["peak_rss_bytes"]
    return out


def format_table(s: dict[str, Any], args: argparse.Namespace) -> str:
    what = f"LoRA rank {args.lora}, {args.arch}" if args.lora else f"{args.layers}-layer slice of {args.arch}"
    lines = [f"training step, {what}, {args.batch} x {args.tokens} tokens, ours {args.precision}"
             f"{' + optimizer in backward' if args.optimizer_in_backward else ''}, ref {args.ref_precision}, "
             f"{torch.get_num_threads()} threads, best of {args.repeats}"]  # fmt: skip
    for impl in ("ours", "ref"):
        if impl not in s:
            continue
        r = s[impl]
        line = (f"  {impl:5} forward {r['forward_s']:.2f} s + backward {r['backward_s']:.2f} s = "
                f"{r['forward_backward_s']:.2f} s ({r['tokens_per_s']:.0f} tok/s), optimizer {r['optimizer_s']:.2f} s, "
                f"whole step {r['step_s']:.2f} s, "
                f"peak RSS {r['peak_rss_bytes'] / GB:.2f} GB (weights {r['weight_bytes'] / GB:.2f})")  # fmt: skip
        lines.append(line)
        if "gemm_floor_s" in r:
            tflop = r["gemm_flops"] / 1e12
            lines.append(f"        GEMM floor {r['gemm_floor_s']:.2f} s ({tflop:.2f} TFLOP, "
                         f"{r['gemm_flops'] / r['gemm_floor_s'] / 1e9:.0f} GFLOP/s): step / floor "
                         f"{r['vs_gemm_floor']:.2f}x")  # fmt: skip
    if "speedup" in s:
        lines.append(f"  forward + backward speed-up {s['speedup']:.2f}x, whole step {s['step_speedup']:.2f}x; "
                     f"peak RSS ratio {s['rss_ratio']:.2f}x")  # fmt: skip
    if "adamw" in s:
        a = s["adamw"]
        lines.append("  AdamW step: " + ", ".join(f"{k} {v:.2f} s" for k, v in a.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zamba2.bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="1.2b", choices=["tiny", "1.2b"], help="Zamba2Config.preset (tiny: tests)")
    p.add_argument("--layers", type=int, default=6, help="layers of the 1.2B slice (the last one hybrid)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4, help="rounds; the best counts")
    p.add_argument("--lora", type=int, metavar="RANK", help="LoRA of this rank on the full 1.2B architecture")
    p.add_argument("--adamw", choices=list(OPTIMIZERS), default="fused", help="the workers' AdamW implementation")
    p.add_argument("--no-adamw", action="store_true", help="skip the AdamW comparison worker")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in backward (both sides)")
    p.add_argument("--precision", choices=["autocast", "bf16"], default="bf16",
                   help="ours: fp32 weights under autocast, or bf16 weights + fp32 masters in the step")  # fmt: skip
    p.add_argument("--ref-precision", choices=["autocast", "bf16"], default="autocast", help="the same, reference")
    p.add_argument("--optimizer-in-backward", action="store_true", help="ours: step each parameter in the backward")
    p.add_argument("--only", choices=["ours", "ref"])
    p.add_argument("--no-ref-warmup", action="store_true",
                   help="no warm-up step for the reference (where its step takes tens of minutes: a CPU without bf16 "
                   "GEMM kernels); its peak RSS then lacks the AdamW moments in forward and backward")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="where to write the results (bench-results/train-*.json)")
    p.add_argument("--worker", choices=["ours", "ref", "adamw"], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--layers", args.layers, 1), ("--tokens", args.tokens, 2), ("--batch", args.batch, 1),
                             ("--repeats", args.repeats, 1), ("--lora", args.lora or 1, 1)):  # fmt: skip
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        allocator.tune()
    except ValueError as err:
        parser.error(str(err))
    if args.worker is not None:
        return worker_main(args)
    try:
        raw = run(args)
    except RuntimeError as err:
        print(f"zamba2 bench train: {err}", file=sys.stderr)
        return 1
    summary = summarise(raw, args)
    report = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": summary, "raw": raw}
    name = f"train-lora{args.lora}-{args.arch}" if args.lora else f"train-{args.arch}-{args.layers}layers"
    path = Path(args.json or f"bench-results/{name}-{args.batch}x{args.tokens}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(summary, args))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
