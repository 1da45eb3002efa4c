"""Per-kernel timings behind the quantisation figures: one linear's float product against the int8 and int4 kernels.

    python -m zamba2.bench.kernels            # the 1.2B architecture's decode-step shapes, batch 1, bf16
    python -m zamba2.bench.kernels --batch 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zamba2.quant import QuantizedLinear

# (out, in) of the 1.2B architecture's large linears: mamba in_proj / out_proj, shared q (= k = v), MLP gate_up /
# down, lm_head
SHAPES_1_2B = [(8512, 2048), (2048, 4096), (4096, 4096), (16384, 2048), (2048, 8192), (32000, 2048)]


def bench_linear(
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 50,
    group_size: int = 64,
    batch: int = 1,
    copies: int = 8,
    repeats: int = 5,
) -> dict[str, float]:
    """Milliseconds per (batch, in) @ (in, out) call: float F.linear vs the int8 and int4 kernels.

    Each variant cycles through `copies` distinct weights so that, as in a real decode step, the
    weights come from memory rather than from the last-level cache. The variants are timed in
    turn, `repeats` rounds of `iters` calls each, and the fastest round counts (robust to a shared
    machine).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, in_features, dtype=dtype)
    variants: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {"float": [], "int8": [], "int4": []}
    for _ in range(copies):
        weight = torch.randn(out_features, in_features) / in_features**0.5
        float_weight = weight.to(dtype)
        variants["float"].append(lambda t, w=float_weight: F.linear(t, w))
        variants["int8"].append(QuantizedLinear.from_weight(weight, None, "int8"))
        variants["int4"].append(QuantizedLinear.from_weight(weight, None, "int4", group_size))
    times = {label: float("inf") for label in variants}
    with torch.inference_mode():
        for fns in variants.values():
            for fn in fns:  # warm-up; builds the kernel caches
                fn(x)
        for _ in range(repeats):
            for label, fns in variants.items():
                start = time.perf_counter()
                for i in range(iters):
                    fns[i % copies](x)
                times[label] = min(times[label], (time.perf_counter() - start) / iters * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zamba2.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1, help="rows of the input (1: decode)")
    p.add_argument("--iters", type=int, default=50, help="calls per timed round")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'out x in':>14}{'bf16 ms':>10}{'int8 ms':>10}{'int4 ms':>10}{'int8 x':>8}{'int4 x':>8}")
    for out_features, in_features in SHAPES_1_2B:
        t = bench_linear(out_features, in_features, batch=args.batch, iters=args.iters)
        print(f"{out_features:>7}x{in_features:<6}{t['float']:10.3f}{t['int8']:10.3f}{t['int4']:10.3f}"
              f"{t['float'] / t['int8']:8.2f}{t['float'] / t['int4']:8.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
