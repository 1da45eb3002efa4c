"""Export the draft model: a 3-layer model of the default model's recipe, for speculative decoding.

    python recipes/default_model/draft.py BUILD_DIR

Reads BUILD_DIR/run (what `zamba2 train --config recipes/default_model/draft.json` left there, fp32 masters;
`make draft-model` runs both) and writes zamba2/models/shakespeare-draft/: bf16 weights, config, tokenizer,
generation_config and a short model card with its held-out perplexities (context 512, stride 256, as the
default model's card). It shares the default model's tokenizer, so `--draft-model` takes it as is.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from zamba2 import Zamba2ForCausalLM  # noqa: E402
from zamba2.eval.perplexity import Document, combined, perplexity  # noqa: E402
from zamba2.eval.scorers import LocalScorer  # noqa: E402
from zamba2.tokenizer import Tokenizer  # noqa: E402

DEST = REPO / "zamba2" / "models" / "shakespeare-draft"
MAIN = REPO / "zamba2" / "models" / "shakespeare"
CONTEXT, STRIDE = 512, 256


def main(build: Path) -> None:
    model = Zamba2ForCausalLM.from_pretrained(build / "run", dtype="float32", progress=False).eval()
    model.to(torch.bfloat16).save_pretrained(DEST)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(MAIN / name, DEST / name)
    model = Zamba2ForCausalLM.from_pretrained(DEST, progress=False).eval()
    tok = Tokenizer.from_pretrained(DEST)
    figures = {}
    for path in (build.parent / "default-model" / "heldout").glob("*.txt"):
        scores = perplexity(LocalScorer(model), tok, [Document(path.name, path.read_text(encoding="utf-8"))],
                            CONTEXT, STRIDE, True)  # fmt: skip
        figures[path.name] = round(combined(path.name, scores).perplexity, 2)
    records = [json.loads(x) for x in (build / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    main_figures = json.loads((MAIN / "evaluation.json").read_text())["heldout"]["bf16"]
    rows = "\n".join(f"| {name} | {ppl} | {main_figures.get(name, float('nan')):.2f} |"
                     for name, ppl in sorted(figures.items()))  # fmt: skip
    card = f"""# shakespeare-draft: the default model's draft for speculative decoding

A 3-layer Zamba2 (two Mamba2 layers, one hybrid layer with the shared attention block; hidden size 256, the
Mistral v0.1 tokenizer) trained with the default model's recipe and data (`make draft-model`,
`recipes/default_model/draft.json`): {steps[-1]["step"]} steps, {steps[-1]["tokens"]:,} tokens. It writes
worse pseudo-Shakespeare than `zamba2/models/shakespeare`, at about twice its decode speed on a CPU core (141
against 68 tokens/s, measured with one thread): its job is to propose
tokens for that model to check (`zamba2 generate --draft-model {DEST.relative_to(REPO)}`).

Held-out perplexity per token, bf16, windows of {CONTEXT} tokens moving by {STRIDE}:

| text | this draft | the default model |
|---|---|---|
{rows}
"""
    (DEST / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/draft-model"))
