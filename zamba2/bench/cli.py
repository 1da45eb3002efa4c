"""`zamba2 bench` / `python -m zamba2.bench`: the flags, and the run from them to the table and the JSON."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from zamba2 import allocator
from zamba2.bench.memory import linear_weight_bytes, measure_bandwidth
from zamba2.bench.models import DTYPES, quality
from zamba2.bench.report import (
    combine_bandwidth,
    format_table,
    machine_info,
    measure,
    measure_load,
    plot,
    speedups,
    summarise,
)
from zamba2.bench.runner import worker_main
from zamba2.config import Zamba2Config

LONG_PROMPT = 16384  # added by --long


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive token counts like 128,512,2048; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from zamba2 import bench  # the package's docstring describes the command (imported here: it imports us)

    p = argparse.ArgumentParser(prog="zamba2 bench", description=bench.__doc__.split("\n\n")[0])
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
    try:  # before the workers start: they inherit ZAMBA2_MALLOC and apply the same setting
        allocator.tune()
    except ValueError as err:
        parser.error(str(err))
    if args.long and LONG_PROMPT not in args.lengths:
        args.lengths = [*args.lengths, LONG_PROMPT]
    if args.worker is not None:
        return worker_main(args)
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
