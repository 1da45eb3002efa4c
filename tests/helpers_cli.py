"""Model folders for command-line tests: a random tiny Zamba2 saved with the Mistral v0.1 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.tokenizer import Tokenizer

TOKENIZER_MODEL = Path(__file__).parent / "fixtures" / "mistral-v0.1-tokenizer.model"

# A small ChatML-like template; the markers are plain text for the Mistral vocabulary.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]:{% endif %}"
)


def write_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (converted once from the SentencePiece fixture)."""
    spm = folder / "_spm"
    spm.mkdir(parents=True)
    shutil.copyfile(TOKENIZER_MODEL, spm / "tokenizer.model")
    tokenizer = Tokenizer.from_pretrained(spm)
    shutil.rmtree(spm)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)


def make_model_folder(folder: Path, chat_template: str | None = None, seed: int = 0, **overrides) -> Path:
    """Save a random `tiny` Zamba2ForCausalLM (vocab 32000, fp32) and the tokenizer into `folder`."""
    torch.manual_seed(seed)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny", **overrides)).eval()
    model.save_pretrained(folder)
    write_tokenizer(folder, chat_template)
    return folder


def set_chat_template(folder: Path, template: str | None) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))
