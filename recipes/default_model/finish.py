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
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("build", type=Path, nargs="?", default=Path("build/default-model"))
    p.add_argument("--checkpoint", action="store_true", help="export the newest checkpoint of a run in progress")
    args = p.parse_args()
    t = time.time()
    export(args.build, args.checkpoint)
    print(f"exported to {DEST} in {time.time() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
