"""zamba2: a standalone PyTorch implementation of Zyphra's Zamba2 hybrid language models.

Public names are imported lazily so that `import zamba2.sampling` (or the CLI's `--help`) does not pay
for building the whole model stack.
"""

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The model shipped inside the package (a 16M Zamba2 trained on Shakespeare by recipes/default_model; its
# README.md is the model card): what `zamba2 generate`, `chat`, `serve` and the demo use without --model.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "shakespeare"

_PUBLIC = {
    "Zamba2Config": "zamba2.config",
    "Zamba2Model": "zamba2.model",
    "Zamba2ForCausalLM": "zamba2.model",
    "Zamba2ForSequenceClassification": "zamba2.model",
    "HybridCache": "zamba2.cache",
    "Tokenizer": "zamba2.tokenizer",
    "GenerationConfig": "zamba2.generation_config",
    "tune_allocator": "zamba2.allocator:tune",  # name in zamba2 -> "module:attribute" where it differs
    # transformers' Auto* names, so that code written against transformers changes only its import line.
    # They are our classes themselves: AutoModelForCausalLM.from_pretrained is Zamba2ForCausalLM.from_pretrained.
    "AutoTokenizer": "zamba2.tokenizer:Tokenizer",
    "AutoConfig": "zamba2.config:Zamba2Config",
    "AutoModel": "zamba2.model:Zamba2Model",
    "AutoModelForCausalLM": "zamba2.model:Zamba2ForCausalLM",
    "AutoModelForSequenceClassification": "zamba2.model:Zamba2ForSequenceClassification",
}

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoTokenizer",
    "GenerationConfig",
    "DEFAULT_MODEL",
    "HybridCache",
    "Tokenizer",
    "Zamba2Config",
    "Zamba2ForCausalLM",
    "Zamba2ForSequenceClassification",
    "Zamba2Model",
    "tune_allocator",
]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'zamba2' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    return getattr(import_module(module), attr or name)


if TYPE_CHECKING:  # pragma: no cover
    from zamba2.allocator import tune as tune_allocator
    from zamba2.cache import HybridCache
    from zamba2.config import Zamba2Config
    from zamba2.generation_config import GenerationConfig
    from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification, Zamba2Model
    from zamba2.tokenizer import Tokenizer

    AutoTokenizer = Tokenizer
    AutoConfig = Zamba2Config
    AutoModel = Zamba2Model
    AutoModelForCausalLM = Zamba2ForCausalLM
    AutoModelForSequenceClassification = Zamba2ForSequenceClassification
