"""`python -m zamba2.demo` (what `make demo` runs): the whole `zamba2 generate` path, offline, on the model
shipped inside the package (zamba2.DEFAULT_MODEL: a 16M-parameter Zamba2 trained on Shakespeare's plays by
recipes/default_model). Loading, tokenisation, prefill, cached decode, streaming text and the statistics line.
"""

from __future__ import annotations

import sys

import zamba2
from zamba2 import cli

PROMPT = "To be, or not to be"
ARGS = ["--max-new-tokens", "120", "--temperature", "0.8", "--top-k", "50", "--seed", "1"]
REAL_MODEL = 'zamba2 generate --model Zyphra/Zamba2-1.2B-instruct --chat "Why is the sky blue?"'


def main() -> int:
    folder = zamba2.DEFAULT_MODEL
    if not (folder / "model.safetensors").is_file():
        print(f"zamba2 demo: error: {folder}/model.safetensors is missing (a broken install?)", file=sys.stderr)
        return 1
    print(f"The default model: {folder} (a small Zamba2 trained on Shakespeare; see its README.md).")
    print(f'Running: zamba2 generate {" ".join(ARGS)} "{PROMPT}"\n', flush=True)
    code = cli.main(["generate", "--model", str(folder), *ARGS, PROMPT])
    print(
        "\nThe model writes pseudo-Shakespeare; it does not answer questions.\n"
        f"For a published Zamba2 (downloads a few GB): {REAL_MODEL}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
