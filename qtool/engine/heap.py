"""Handing freed memory back to the operating system between decoder blocks.

A block's tensors of up to ~32 MiB (a 2048 x 2048 float32 weight, its rounding offsets, a batch's
smaller activations) come from glibc's heap arenas, not from their own mappings; freed, they stay
in the process as free heap, fragmented, and the next block's tensors of other sizes do not
always fit in the holes. Over 22 blocks of a 1.1 B model that made resident memory grow by ~0.7 GiB
(tests/bench/results/scale.md). `trim()` asks glibc to give free heap pages back
(`malloc_trim(0)`), after each block: nothing is freed that is in use, and it costs milliseconds.
Elsewhere than glibc (musl, macOS, Windows) it does nothing. `QTOOL_MALLOC_TRIM=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_trim = None


def _malloc_trim():
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _trim = fn
            except (OSError, AttributeError):  # not glibc
                pass
    return _trim


def trim() -> bool:
    """Free heap pages back to the OS where the C library can; True where it released something."""
    if os.environ.get("QTOOL_MALLOC_TRIM", "1").strip() == "0":
        return False
    fn = _malloc_trim()
    return bool(fn(0)) if fn else False
