"""The opt-in torch.compile switch for decode-step fusions (`--compile`).

`enable(True)` routes the functions passed to `run` through torch.compile (CPU: inductor's C++ backend). Each
function is compiled once and shared by every layer, since all weights and states are arguments; automatic
dynamic shapes make a second batch size recompile once with a symbolic batch, after which a server's changing
batch sizes reuse that graph. A compile failure (no C++ compiler, unsupported device) warns once and every
later call runs eagerly. With autograd on, calls always run eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

_enabled = False
_compiled: dict[Callable, Callable] = {}


def enable(flag: bool) -> None:
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether `run` compiles now (switched on, and no gradient being recorded)."""
    return _enabled and not torch.is_grad_enabled()


def run(fn: Callable, *args: Any, eager: Callable | None = None) -> Any:
    """fn(*args), compiled when enabled; otherwise `eager(*args)` (default: fn itself)."""
    global _enabled
    if enabled():
        try:
            compiled = _compiled.get(fn)
            if compiled is None:
                compiled = _compiled[fn] = torch.compile(fn, fullgraph=True)
            return compiled(*args)
        except Exception as err:
            warnings.warn(f"torch.compile of {fn.__name__} failed ({err!r}); using eager", stacklevel=2)
            _enabled = False
    return (eager or fn)(*args)
