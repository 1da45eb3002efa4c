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
# Speculative decoding: a held-out passage (Macbeth I.3, never trained on), then its start again, so the
# continuation quotes it (the input-grounded workload of zamba2/bench/speculative.py).
PASSAGE = (
    "SCENE III. A heath.\n\n[Thunder. Enter the three Witches.]\n\nFIRST WITCH.\nWhere hast thou been, sister?\n\n"
    "SECOND WITCH.\nKilling swine.\n\nTHIRD WITCH.\nSister, where thou?\n\nFIRST WITCH.\nA sailor's wife had "
    "chestnuts in her lap,\nAnd mounch'd, and mounch'd, and mounch'd:--\"Give me,\" quoth I:\n\"Aroint thee, "
    "witch!\" the rump-fed ronyon cries.\nHer husband's to Aleppo gone, master o' the Tiger:\nBut in a sieve I'll "
    "thither sail,\nAnd, like a rat without a tail,\nI'll do, I'll do, and I'll do.\n\n"
)
QUOTE = PASSAGE + "SCENE III. A heath.\n\n["
QUOTE_ARGS = ["--greedy", "--max-new-tokens", "100"]


def main() -> int:
    folder = zamba2.DEFAULT_MODEL
    if not (folder / "model.safetensors").is_file():
        print(f"zamba2 demo: error: {folder}/model.safetensors is missing (a broken install?)", file=sys.stderr)
        return 1
    print(f"The default model: {folder} (a small Zamba2 trained on Shakespeare; see its README.md).")
    print(f'Running: zamba2 generate {" ".join(ARGS)} "{PROMPT}"\n', flush=True)
    code = cli.main(["generate", "--model", str(folder), *ARGS, PROMPT])
    if code == 0:
        print("\nSpeculative decoding, on a prompt that holds a passage and starts it again (greedy: the same text "
              "both times; compare the decode speeds):\n", flush=True)  # fmt: skip
        for extra in ([], ["--prompt-lookup", "8"]):
            print(f"Running: zamba2 generate {' '.join(QUOTE_ARGS + extra)} <Macbeth I.3, then its start again>",
                  flush=True)  # fmt: skip
            code = code or cli.main(["generate", "--model", str(folder), *QUOTE_ARGS, *extra, QUOTE])
    print(
        "\nThe model writes pseudo-Shakespeare; it does not answer questions.\n"
        f"For a published Zamba2 (downloads a few GB): {REAL_MODEL}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
