"""The run and its report: measurements in ABBA order, best-of-repeats summaries, ratios, checkpoint load,
the machine, the table and the plot."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from zamba2 import allocator
from zamba2.bench.memory import GB
from zamba2.bench.models import DTYPES, build_ours
from zamba2.bench.runner import (
    DECODE_PROMPT,
    TTFT_PROMPT,
    Runner,
    WorkerProcess,
    load_once,
    runner_plan,
    worker_argv,
    worker_env,
)
from zamba2.config import Zamba2Config

# ---- the run -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, impls: list[str]) -> dict[str, dict[str, Any]]:
    """Build each implementation (in a worker, or here), run the repeats in ABBA order, collect results."""
    config, dtype = Zamba2Config.preset(args.arch), DTYPES[args.dtype]
    handles: dict[str, Any] = {}
    try:
        for impl in impls:
            print(f"building {impl} ({args.arch}, {args.dtype}) ...", file=sys.stderr, flush=True)
            if args.no_subprocess:
                handles[impl] = Runner(impl, config, dtype, runner_plan(args))
            else:
                handles[impl] = WorkerProcess(impl, worker_argv(args))
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
            result = load_once(tmp, args.dtype)
        else:
            cmd = [sys.executable, "-m", "zamba2.bench", "--worker", "load", *argv]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=worker_env())
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
        "malloc": allocator.state(),  # every worker, ours and the reference alike, runs with the same setting
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
        + (f", malloc {m['malloc']}" if m.get("malloc") else "")
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
