"""`python -m zamba2.demo` (what `make demo` runs): the whole `zamba2 generate` path, offline.

It builds the `tiny` preset with random weights, saves it with the real Mistral v0.1 tokenizer (the copy in
the repository's tests/fixtures) into a temporary folder, and runs `zamba2 generate --model <folder> ...`
in-process: loading, tokenisation, prefill, cached decode, streaming text and the statistics line.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from zamba2 import cli
from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.tokenizer import Tokenizer

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mistral-v0.1-tokenizer.model"
PROMPT = "The three most important ideas in state space models are"
REAL_MODEL = 'zamba2 generate --model Zyphra/Zamba2-1.2B-instruct --chat "Why is the sky blue?"'


def build(folder: Path, seed: int = 0) -> None:
    """A random-weight tiny Zamba2 with the Mistral v0.1 tokenizer, saved as a model folder."""
    if not TOKENIZER.is_file():
        raise FileNotFoundError(
            f"{TOKENIZER}: not found; the demo needs the repository's tests/fixtures (run it from a checkout)"
        )
    torch.manual_seed(seed)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny")).eval()
    model.save_pretrained(folder)
    spm = folder / "spm"
    spm.mkdir()
    shutil.copyfile(TOKENIZER, spm / "tokenizer.model")
    Tokenizer.from_pretrained(spm).save_pretrained(folder)  # tokenizer.json + tokenizer_config.json
    shutil.rmtree(spm)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="zamba2-demo-") as tmp:
        folder = Path(tmp) / "tiny-random"
        try:
            build(folder)
        except FileNotFoundError as err:
            print(f"zamba2 demo: error: {err}", file=sys.stderr)
            return 1
        print(f"Built the tiny Zamba2 preset with random weights in {folder}.")
        print(f'Running: zamba2 generate --model <folder> --max-new-tokens 48 "{PROMPT}"\n', flush=True)
        code = cli.main(["generate", "--model", str(folder), "--max-new-tokens", "48", PROMPT])
    print(
        "\nThe text above is gibberish because the weights are random: the demo checks the machinery "
        "(loading, tokenizer, hybrid cache, streaming), not the model.\n"
        f"For a real model (downloads a few GB): {REAL_MODEL}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
