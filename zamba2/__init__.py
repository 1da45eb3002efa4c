"""zamba2: a standalone PyTorch implementation of Zyphra's Zamba2 hybrid language models.

Public names are imported lazily so that `import zamba2.sampling` (or the CLI's `--help`) does not pay
for building the whole model stack.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "Zamba2Config": "zamba2.config",
    "Zamba2Model": "zamba2.model",
    "Zamba2ForCausalLM": "zamba2.model",
    "Zamba2ForSequenceClassification": "zamba2.model",
    "HybridCache": "zamba2.cache",
    "Tokenizer": "zamba2.tokenizer",
    "tune_allocator": "zamba2.allocator:tune",  # name in zamba2 -> "module:attribute" where it differs
}

__all__ = [
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
    from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification, Zamba2Model
    from zamba2.tokenizer import Tokenizer
