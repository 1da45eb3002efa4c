"""The bf16 product routes of zamba2/ops/gemm.py side by side: native (torch's bf16 kernels) against upcast (fp32
arithmetic on the exact upcasts), alternating in one process, the best round counts.

    python -m zamba2.bench.gemm                  # the shipped default model, bf16: prefill and a training step
    python -m zamba2.bench.gemm --linears        # also one forward of each 1.2B linear shape at 512 rows

On a CPU with oneDNN's bf16 kernels `auto` is native and the comparison says how much upcasting would cost;
on one without (AVX2), how much it saves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from zamba2.bench.kernels import SHAPES_1_2B
from zamba2.ops import gemm

ROUTES = ("native", "upcast")


def _time(fn: Callable[[], None], route: str, results: dict[str, list[float]]) -> None:
    gemm.set_mode(route)
    start = time.perf_counter()
    fn()
    results.setdefault(route, []).append(time.perf_counter() - start)


def compare(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per case and route (best of `repeats`, routes alternating ABBA), and native / upcast."""
    out: dict[str, dict[str, float]] = {}
    try:
        for name, fn in cases.items():
            for route in ROUTES:  # warm-up of both routes: first-touch pages, kernels
                gemm.set_mode(route)
                fn()
            times: dict[str, list[float]] = {}
            for r in range(repeats):
                for route in ROUTES if r % 2 == 0 else reversed(ROUTES):
                    _time(fn, route, times)
            best = {route: min(times[route]) for route in ROUTES}
            out[name] = {**best, "native_over_upcast": best["native"] / best["upcast"]}
            print(f"{name:<34} native {best['native']:8.3f} s  upcast {best['upcast']:8.3f} s  "
                  f"{out[name]['native_over_upcast']:6.2f}x", flush=True)  # fmt: skip
    finally:
        gemm.set_mode(None)
    return out


def model_cases(tokens: int) -> dict[str, Callable[[], None]]:
    from zamba2 import DEFAULT_MODEL
    from zamba2.model import Zamba2ForCausalLM

    model = Zamba2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def prefill() -> None:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)

    def train_step() -> None:
        model.train()
        model(ids, labels=ids, use_cache=False, loss_only=True).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    return {f"default model prefill {tokens}": prefill, f"default model fwd+bwd {tokens}": train_step}


def linear_cases(rows: int) -> dict[str, Callable[[], None]]:
    cases = {}
    for out_f, in_f in SHAPES_1_2B:
        x, w = torch.randn(rows, in_f).to(torch.bfloat16), (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)

        def forward(x: torch.Tensor = x, w: torch.Tensor = w) -> None:
            gemm.linear(x, w)

        cases[f"linear {rows} x {in_f} -> {out_f}"] = forward
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zamba2.bench.gemm", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="rounds per route; the best counts")
    p.add_argument("--linears", action="store_true", help="also the 1.2B linear shapes, forward only")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", help="where to write the results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bf16 GEMM kernels on this CPU: {'yes' if gemm.has_native_kernels(torch.bfloat16) else 'no'} "
          f"(auto = {'native' if gemm.has_native_kernels(torch.bfloat16) else 'upcast'}); "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    cases = model_cases(args.tokens)
    if args.linears:
        cases.update(linear_cases(args.tokens))
    results = compare(cases, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
