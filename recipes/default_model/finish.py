"""Export the trained default model into the package and write its model card.

    python recipes/default_model/finish.py BUILD_DIR [--checkpoint]

Reads BUILD_DIR/run (what `zamba2 train` left there: a save_pretrained folder, fp32 masters) or, with
--checkpoint, the run's newest training checkpoint (to look at a run in progress), and writes
zamba2/models/shakespeare/: bf16 model.safetensors, config.json, generation_config.json, tokenizer.json +
tokenizer_config.json (with the play-script chat template), evaluation.json (the figures) and README.md
(the model card). Perplexities come from `zamba2.eval` (the scoring `zamba2 eval` and the server use).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from card import model_card  # noqa: E402

from zamba2 import Zamba2Config, Zamba2ForCausalLM  # noqa: E402
from zamba2.tokenizer import Tokenizer  # noqa: E402

DEST = REPO / "zamba2" / "models" / "shakespeare"
CONTEXT, STRIDE = 512, 256  # perplexity windows: every token scored with at least 256 tokens of context
EXCERPT = REPO / "tests" / "fixtures" / "macbeth-excerpt.txt"
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.8,
              "top_k": 50, "max_new_tokens": 200}  # fmt: skip


def load_trained(build: Path, from_checkpoint: bool) -> Zamba2ForCausalLM:
    run = build / "run"
    if not from_checkpoint:
        return Zamba2ForCausalLM.from_pretrained(run, dtype="float32", progress=False)
    pointer = (run / "checkpoints" / "latest").read_text().strip()
    state = load_file(str(run / "checkpoints" / pointer / "trainable.safetensors"))
    config = Zamba2Config.from_json_file(Path(__file__).parent / "config.json")
    model = Zamba2ForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"checkpoint {pointer} does not match the config: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    print(f"exporting the run in progress: {pointer}", file=sys.stderr)
    return model


def export(build: Path, from_checkpoint: bool) -> None:
    model = load_trained(build, from_checkpoint).eval()
    model.to(torch.bfloat16).save_pretrained(DEST)
    (DEST / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    Tokenizer.from_pretrained(build / "tokenizer").save_pretrained(DEST)
    for leftover in ("tokenizer.model", "special_tokens_map.json"):
        (DEST / leftover).unlink(missing_ok=True)


def training_summary(build: Path) -> dict:
    """Tokens seen, steps, and the wall time of the steps (resumed sittings counted without their gaps)."""
    records = [json.loads(x) for x in (build / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    seconds = 0.0
    prev_tokens = 0
    for r in steps:
        seconds += (r["tokens"] - prev_tokens) / max(r["tokens_per_s"], 1e-9)
        prev_tokens = r["tokens"]
    start = next((r for r in records if r.get("event") == "start"), {})
    return {"steps": steps[-1]["step"] if steps else 0, "tokens_seen": prev_tokens,
            "train_hours": round(seconds / 3600, 2), "parameters": start.get("parameters"),
            "train_targets_per_epoch": start.get("train_targets")}  # fmt: skip


def bigram_baseline(build: Path, tok, heldout: list[Path]) -> dict[str, float]:
    """Perplexity of an interpolated token bigram fitted on the training split (the figure to beat):
    p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p1(w), p1 the add-one unigram; the best lam of a small grid."""
    import numpy as np

    def ids_of(path: Path) -> np.ndarray:
        return np.array(tok.encode(path.read_text(encoding="utf-8")) + [tok.eos_token_id], dtype=np.int64)

    train = [ids_of(p) for p in sorted((build / "train").glob("*.txt"))]
    V = tok.vocab_size
    uni = np.ones(V)
    pairs: dict[int, int] = {}
    for ids in train:
        np.add.at(uni, ids, 1)
        for key in (ids[:-1] * V + ids[1:]).tolist():
            pairs[key] = pairs.get(key, 0) + 1
    ctx = uni - 1  # counts of each token as a context (all but the add-one)
    p1 = uni / uni.sum()
    best: dict[str, float] = {}
    for lam in (0.5, 0.6, 0.7, 0.8, 0.9):
        row = {}
        for path in heldout:
            ids = ids_of(path)
            v, w = ids[:-1], ids[1:]
            c = np.array([pairs.get(k, 0) for k in (v * V + w).tolist()], dtype=np.float64)
            p2 = np.where(ctx[v] > 0, c / np.maximum(ctx[v], 1), 0.0)
            row[path.name] = float(np.exp(-np.mean(np.log(lam * p2 + (1 - lam) * p1[w]))))
        if not best or sum(row.values()) < sum(best.values()):
            best = row
    return best


def evaluate(build: Path) -> dict:
    from zamba2.eval import score_tokens
    from zamba2.eval.perplexity import Document
    from zamba2.eval.quality import format_table, quality_table

    heldout = [build / "heldout" / "macbeth_gut.txt", build / "heldout" / "tempest_gut.txt",
               build / "sonnets" / "sonnets_gut.txt"]  # fmt: skip
    docs = [Document(p.name, p.read_text(encoding="utf-8")) for p in heldout]
    table = quality_table(DEST, docs, CONTEXT, STRIDE)
    print(format_table(table), file=sys.stderr)
    model = Zamba2ForCausalLM.from_pretrained(DEST, progress=False).eval()
    tok = Tokenizer.from_pretrained(DEST)
    ids = tok.encode(EXCERPT.read_text(encoding="utf-8"))
    excerpt = math.exp(-float(score_tokens(model, ids).logprobs.double().mean()))
    return {"context_length": CONTEXT, "stride": STRIDE, "heldout": table,
            "excerpt": {"file": "tests/fixtures/macbeth-excerpt.txt", "tokens": len(ids), "perplexity": excerpt},
            "bigram": bigram_baseline(build, tok, heldout), "training": training_summary(build)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("build", type=Path, nargs="?", default=Path("build/default-model"))
    p.add_argument("--checkpoint", action="store_true", help="export the newest checkpoint of a run in progress")
    p.add_argument("--no-eval", action="store_true", help="export only (no figures, no card)")
    args = p.parse_args()
    t = time.time()
    export(args.build, args.checkpoint)
    print(f"exported to {DEST} in {time.time() - t:.1f} s", file=sys.stderr)
    if args.no_eval:
        return
    figures = evaluate(args.build)
    (DEST / "evaluation.json").write_text(json.dumps(figures, indent=1) + "\n")
    (DEST / "README.md").write_text(model_card(figures))
    print(f"figures and model card written in {time.time() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
