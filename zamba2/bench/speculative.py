"""Speculative decoding benchmark: (a) what a verification costs, (b) what speculation gains end to end.

    python -m zamba2.bench.speculative verify            # 1.2B architecture, bf16, random weights
    python -m zamba2.bench.speculative decode --draft DIR   # the shipped default model, DIR a smaller one

(a) `verify`: one decode step (one token through the cache) against one verification of k drafts (k + 1 tokens
in one forward, under `begin_speculation`, then `commit` of half of them: the rollback is included), k = 1..8,
after a prompt of --context tokens. The times alternate within each round and the best of --rounds counts;
the ratio verify(k) / decode is what one check costs in decode steps. With acceptance rate a per draft and k
drafts per check, a check emits (1 - a^(k+1)) / (1 - a) tokens on average, which gives the projected speed-up.

(b) `decode`: tokens/s of plain decode, prompt lookup and a draft model on the default model (greedy unless
said), in one run, rounds alternating, best of --rounds: an input-grounded workload (the prompt holds a held-out
passage, then starts it again: the continuation quotes it), and plain continuation (an opening line), greedy
and sampled. Greedy outputs are checked equal to plain greedy's. Prints a table, --json FILE keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import zamba2
from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.generation import decode_step, prefill
from zamba2.speculative import SpeculationStats

EXCERPT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "macbeth-excerpt.txt"


# ---- (a) verification cost -------------------------------------------------------------------------


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def verify_cost(model, context: int, ks: list[int], rounds: int, seed: int = 0) -> dict[str, Any]:
    """Best-of-rounds seconds of one decode step and of one k-draft verification + commit, same cache."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompt = torch.randint(3, V, (1, context), generator=g)
    cache = HybridCache(model.config, 1, context + max(ks) + 8, dtype=model.dtype)
    prefill(model, prompt, None, cache)
    base = cache.seq_len

    snapshot = (cache.conv_states.clone(), cache.ssm_states.clone())

    def restore() -> None:  # back to the prefilled state, so that every timing sees the same cache
        cache.conv_states.copy_(snapshot[0])
        cache.ssm_states.copy_(snapshot[1])
        cache.seq_len, cache.positions[:] = base, base

    def one_decode() -> None:  # a plain step, as generation takes it
        decode_step(model, torch.tensor([5]), cache)

    def one_verify(k: int) -> None:  # what Speculator.step does around its forward: open, feed k + 1, commit
        cache.begin_speculation()
        ids = torch.randint(3, V, (1, k + 1), generator=g)
        model(ids, past_key_values=cache, logits_to_keep=0)
        cache.commit((k + 1) // 2)

    best = {"decode": float("inf"), **{k: float("inf") for k in ks}}
    one_decode()  # warm-up
    restore()
    for _ in range(rounds):
        best["decode"] = min(best["decode"], _timed(one_decode))
        restore()
        for k in ks:
            best[k] = min(best[k], _timed(lambda k=k: one_verify(k)))
            restore()
    return {"decode_s": best["decode"], "verify_s": {k: best[k] for k in ks},
            "ratio": {k: best[k] / best["decode"] for k in ks}}  # fmt: skip


def projected_speedup(ratio: float, acceptance: float, k: int) -> float:
    """Tokens per decode-step time of k-draft checks at per-draft acceptance `acceptance` (proposal cost 0)."""
    a = min(acceptance, 0.999999)
    return (1 - a ** (k + 1)) / (1 - a) / ratio


# ---- (b) end to end ------------------------------------------------------------------------------


def workloads(tokenizer, passage_tokens: int) -> dict[str, tuple[list[int], dict[str, Any]]]:
    """name -> (prompt ids, sampling kwargs)."""
    text = EXCERPT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    passage = ids[1 : passage_tokens + 1]
    grounded = [ids[0], *passage, *tokenizer.encode("\n\n", add_special_tokens=False), *passage[:12]]
    opening = tokenizer.encode("KING HENRY.\nNow, lords, ")
    sampled = {"do_sample": True, "temperature": 0.8, "top_k": 50}
    return {
        "input-grounded (greedy)": (grounded, {"do_sample": False}),
        "plain continuation (greedy)": (opening, {"do_sample": False}),
        "plain continuation (sampled)": (opening, sampled),
    }


def _run(model, ids: list[int], n: int, kwargs: dict, method: dict, seed: int) -> tuple[float, list[int], Any]:
    stats = SpeculationStats() if method else None
    extra = {**method, "speculation_stats": stats} if method else {}
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, seed=seed, **kwargs, **extra)
    return time.perf_counter() - start, out[0, len(ids) :].tolist(), stats


@torch.no_grad()
def decode_gain(model, draft, tokenizer, n: int, rounds: int, lookup_ks: list[int], draft_k: int,
                passage_tokens: int) -> list[dict[str, Any]]:  # fmt: skip
    methods: dict[str, dict] = {"plain": {}}
    for k in lookup_ks:
        methods[f"prompt lookup k={k}"] = {"prompt_lookup_num_tokens": k}
    if draft is not None:
        methods[f"draft model k={draft_k}"] = {"assistant_model": draft, "num_assistant_tokens": draft_k}
    rows = []
    for name, (ids, kwargs) in workloads(tokenizer, passage_tokens).items():
        best: dict[str, float] = {m: float("inf") for m in methods}
        tokens: dict[str, list[int]] = {}
        stats: dict[str, Any] = {}
        _run(model, ids, 8, kwargs, {}, 0)  # warm-up
        for r in range(rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for m in order:
                seconds, out, st = _run(model, ids, n, kwargs, methods[m], seed=r)
                best[m] = min(best[m], seconds)
                tokens[m], stats[m] = out, st
        plain = best["plain"]
        for m in methods:
            st = stats[m]
            rows.append({
                "workload": name, "method": m, "prompt_tokens": len(ids), "new_tokens": n,
                "seconds": best[m], "tokens_per_s": n / best[m], "vs_plain": plain / best[m],
                "acceptance": None if st is None else st.acceptance_rate,
                "verifications": None if st is None else st.verifications,
                "plain_steps": None if st is None else st.plain_steps,
                "proposed": None if st is None else st.proposed,
                "same_tokens": None if kwargs.get("do_sample") else tokens[m] == tokens["plain"],
            })  # fmt: skip
    return rows


def project(rows: list[dict[str, Any]], ratio: dict[int, float]) -> None:
    """Add `projected`: the speed-up the same checks and plain steps would give where one k-draft check costs
    ratio[k] decode steps (a `verify` run, e.g. at 1.2B). Prompt lookup only: its proposals cost nothing, a
    draft model's depend on the draft. The first token comes from the prefill on both sides."""
    for r in rows:
        if r["verifications"] is None or not r["method"].startswith("prompt lookup"):
            continue
        k = max(1, min(max(ratio), round(r["proposed"] / max(r["verifications"], 1))))
        cost = r["plain_steps"] + r["verifications"] * ratio[k]  # in decode steps
        r["projected"] = (r["new_tokens"] - 1) / cost


def _table(rows: list[dict[str, Any]]) -> str:
    projected = any("projected" in r for r in rows)
    head = "| workload | method | tok/s | vs plain | acceptance | checks / plain steps | greedy = plain |"
    lines = [head + (" projected |" if projected else ""), "|---|---|---|---|---|---|---|" + ("---|" * projected)]
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        checks = "" if r["verifications"] is None else f"{r['verifications']} / {r['plain_steps']}"
        same = "" if r["same_tokens"] is None else ("yes" if r["same_tokens"] else "NO")
        line = (f"| {r['workload']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_plain']:.2f}x | {acc} | "
                f"{checks} | {same} |")  # fmt: skip
        if projected:
            line += f" {r['projected']:.2f}x |" if "projected" in r else " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zamba2.bench.speculative", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("verify", help="(a) verification cost against one decode step")
    v.add_argument("--arch", default="1.2b", help="preset of the random-weight model (default 1.2b)")
    v.add_argument("--layers", type=int, help="cut the architecture to its first N layers (a quick run)")
    v.add_argument("--context", type=int, default=256, help="prompt tokens in the cache (default 256)")
    v.add_argument("--max-k", type=int, default=8)
    d = sub.add_parser("decode", help="(b) end-to-end tokens/s on the default model")
    d.add_argument("--model", default=str(zamba2.DEFAULT_MODEL))
    d.add_argument("--draft", help="a smaller model with the same tokenizer (e.g. recipes/default_model draft)")
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--lookup-tokens", type=int, nargs="+", default=[8], help="prompt lookup's k (several: each a row)")
    d.add_argument("--draft-tokens", type=int, default=4)
    d.add_argument("--passage-tokens", type=int, default=200, help="held-out tokens the grounded prompt holds")
    d.add_argument("--verify-json", metavar="FILE", help="a `verify --json` result: project prompt lookup's "
                   "checks and plain steps onto that model's verification cost")  # fmt: skip
    for q in (v, d):
        q.add_argument("--rounds", type=int, default=3)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
        q.add_argument("--json", metavar="FILE", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.what == "verify":
        from zamba2.bench.models import build_ours

        config = Zamba2Config.preset(args.arch)
        if args.layers:
            kinds = config.layers_block_type[: args.layers]
            config = Zamba2Config.preset(args.arch, num_hidden_layers=args.layers, layers_block_type=kinds)
        model = build_ours(config, dtype).eval()
        ks = list(range(1, args.max_k + 1))
        out = verify_cost(model, args.context, ks, args.rounds)
        print(f"{args.arch}{f' ({args.layers} layers)' if args.layers else ''}, {args.dtype}, context "
              f"{args.context}: one decode step {1000 * out['decode_s']:.1f} ms")  # fmt: skip
        print("| k drafts | verify + commit (ms) | in decode steps | projected speed-up at 50% / 70% / 90% |")
        print("|---|---|---|---|")
        for k in ks:
            r = out["ratio"][k]
            proj = " / ".join(f"{projected_speedup(r, a, k):.2f}x" for a in (0.5, 0.7, 0.9))
            print(f"| {k} | {1000 * out['verify_s'][k]:.1f} | {r:.2f} | {proj} |")
        result: Any = out
    else:
        from zamba2.model import Zamba2ForCausalLM
        from zamba2.tokenizer import Tokenizer

        model = Zamba2ForCausalLM.from_pretrained(args.model, dtype=dtype, progress=False).eval()
        draft = None
        if args.draft:
            draft = Zamba2ForCausalLM.from_pretrained(args.draft, dtype=dtype, progress=False).eval()
        tokenizer = Tokenizer.from_pretrained(args.model)
        result = decode_gain(model, draft, tokenizer, args.new_tokens, args.rounds, args.lookup_tokens,
                             args.draft_tokens, args.passage_tokens)  # fmt: skip
        if args.verify_json:
            ratios = json.loads(Path(args.verify_json).read_text())["ratio"]
            project(result, {int(k): float(v) for k, v in ratios.items()})
        print(_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
