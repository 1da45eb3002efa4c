"""glibc malloc settings for CPU inference: keep freed activation memory for the next chunk instead of returning
it to the kernel.

Every prompt chunk allocates and frees the same few dozen activation buffers of 1-30 MB (at 1.2B and 512 tokens:
in_proj outputs, fp32 scan and norm buffers). With glibc's defaults the larger ones are mmap'ed and unmapped
again, and the top of the heap is handed back past 128 KB of free space, so each chunk faults its pages in anew,
4 KB at a time: 100k-500k page faults per 512-token forward at 1.2B, 0.3-0.9 s of a 3.5-4 s prefill. `tune()`
sets M_MMAP_THRESHOLD to 32 MB (glibc's maximum; smaller buffers come from the heap and are reused) and
M_TRIM_THRESHOLD to 1 GiB (free heap memory up to that much is kept): about 19k faults per forward.

What it costs: memory freed after a long prompt stays in the process (up to TRIM_BYTES of it), reused by the next
request rather than returned; the peak does not grow (a 16k-token prompt at 1.2B peaks at the same RSS).

The settings are process-wide, so importing zamba2 does not apply them: the command line, the server and the
benchmark call `tune()` at start (`ZAMBA2_MALLOC=default` in the environment opts out), and Python users call
`zamba2.tune_allocator()`. On a C library other than glibc it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_BYTES = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
ENV = "ZAMBA2_MALLOC"

_state: str | None = None  # what tune() did: "tuned", "default" (opted out) or "unsupported"


def tune() -> str:
    """Apply the settings once per process; returns "tuned", "default" (ZAMBA2_MALLOC=default) or
    "unsupported" (not glibc, or mallopt refused)."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "default"):
        raise ValueError(f"environment variable {ENV}={os.environ[ENV]!r}: expected 'tuned' or 'default'")
    if choice == "default":
        _state = "default"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "unsupported"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1 and ok
        _state = "tuned" if ok else "unsupported"
    return _state


def state() -> str:
    """"tuned", "default", "unsupported", or "untouched" when tune() has not run in this process."""
    return _state or "untouched"
