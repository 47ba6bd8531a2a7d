"""Quantized-matmul kernels: a pure-torch default for every op, optional backends per device.

Quantizing and exporting never need a kernel; evaluating and running quantized models use them.
Backends register with `register(op, device_type)`; `get(op, device)` falls back to the torch
reference, so every fast path has a reference to be tested against (tests/test_kernels.py).
"""

from __future__ import annotations

from typing import Callable

from . import reference  # relative: importable under any name (see pyproject's package-dir note)

_DEFAULTS: dict[str, Callable] = {"qlinear": reference.qlinear}


def available_ops() -> list[str]:
    return sorted(_DEFAULTS)


def get(op: str, device_type: str = "cpu", backends: dict[tuple[str, str], Callable] | None = None) -> Callable:
    """The implementation of `op` for a device: a registered backend, else the torch reference."""
    if backends and (op, device_type) in backends:
        return backends[(op, device_type)]
    if op not in _DEFAULTS:
        raise KeyError(f"unknown kernel op {op!r}; available: {', '.join(available_ops())}")
    return _DEFAULTS[op]
