"""Compute kernels behind one interface: a pure-torch reference for every op, device backends beside.

Ops (name -> reference):
  qlinear          y = x @ dequantize(QuantizedWeight).T + b          (reference.py)
  int4_dequantize  packed W4 (`Int4Weight`) -> dense [out, in]        (int4.py)
  int4_linear      y = x @ dequantize(Int4Weight).T + b, no dense copy kept (int4.py)
  gguf_quantize    float rows -> llama.cpp's GGUF block bytes (gguf_blocks.py -> formats/gguf/quants.py)
  gguf_dequantize  GGUF block bytes -> float32 rows (gguf_blocks.py -> gguf-py)
  gguf_quantize_error  gguf_quantize + (|x|^2, |x - dequantized|^2), the writer's error figure

Backends (cpu.py: ATen's W4 kernel; ggml_cpu.py: the GGUF block ops in C; cuda.py: Triton) register per (op, device type) with a
`supports(x, w)` test; `get(op, device_type)` gives the backend when one is available, else the
reference, and `QTOOL_KERNELS=reference` forces the references everywhere (to bisect a
difference). `call(op, x, w, ...)` picks per call, so a shape a backend declines still runs.
tests/test_kernels.py holds every backend to its reference (exact where the op is deterministic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import reference  # relative: importable as qtool.kernels
from .gguf_blocks import dequantize_reference as gguf_dequantize_reference
from .gguf_blocks import quantize_error_reference as gguf_quantize_error_reference
from .gguf_blocks import quantize_reference as gguf_quantize_reference
from .int4 import Int4Weight, dequantize_reference, linear_reference


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    available: Callable[[], bool]
    supports: Callable[..., bool]


_DEFAULTS: dict[str, Callable] = {
    "qlinear": reference.qlinear,
    "int4_dequantize": dequantize_reference,
    "int4_linear": linear_reference,
    "gguf_quantize": gguf_quantize_reference,
    "gguf_dequantize": gguf_dequantize_reference,
    "gguf_quantize_error": gguf_quantize_error_reference,
}
_BACKENDS: dict[tuple[str, str], Backend] = {}


def register(op: str, device_type: str, backend: Backend) -> None:
    if op not in _DEFAULTS:
        raise KeyError(f"unknown kernel op {op!r}; available: {', '.join(available_ops())}")
    _BACKENDS[(op, device_type)] = backend


def available_ops() -> list[str]:
    return sorted(_DEFAULTS)


def _forced_reference() -> bool:
    return os.environ.get("QTOOL_KERNELS", "").lower() == "reference"


def backend_for(op: str, device_type: str) -> Backend | None:
    """The registered, available backend of `op` on `device_type` (None: the reference runs)."""
    b = _BACKENDS.get((op, device_type))
    if b is None or _forced_reference() or not b.available():
        return None
    return b


def get(op: str, device_type: str = "cpu", backends: dict[tuple[str, str], Callable] | None = None) -> Callable:
    """The implementation of `op` for a device: a backend, else the torch reference."""
    if backends and (op, device_type) in backends:
        return backends[(op, device_type)]
    if op not in _DEFAULTS:
        raise KeyError(f"unknown kernel op {op!r}; available: {', '.join(available_ops())}")
    b = backend_for(op, device_type)
    return b.fn if b is not None else _DEFAULTS[op]


def reference_of(op: str) -> Callable:
    return _DEFAULTS[op]


def call(op: str, *args, **kwargs):
    """Run `op`: the backend of its first argument's device if it takes these inputs, else the reference."""
    dev = getattr(args[0], "device", "cpu")  # numpy arrays: "cpu" (numpy 2) or no attribute
    b = backend_for(op, dev if isinstance(dev, str) else dev.type)
    if b is not None and b.supports(*args, **kwargs):
        return b.fn(*args, **kwargs)
    return _DEFAULTS[op](*args, **kwargs)


def _register_builtin() -> None:
    from . import cpu, cuda, ggml_cpu

    register("int4_linear", "cpu", Backend("aten-int4pack", cpu.linear, cpu.available, cpu.supports))
    register("int4_linear", "cuda", Backend("triton", cuda.linear, cuda.available, cuda.supports))
    register("int4_dequantize", "cuda", Backend("triton", cuda.dequantize, cuda.available, cuda.supports_weight))
    register("gguf_quantize", "cpu", Backend("c", ggml_cpu.quantize, ggml_cpu.available, ggml_cpu.supports_quantize))
    register("gguf_quantize_error", "cpu",
             Backend("c", ggml_cpu.quantize_with_error, ggml_cpu.available, ggml_cpu.supports_quantize))
    register("gguf_dequantize", "cpu", Backend("c", ggml_cpu.dequantize, ggml_cpu.available, ggml_cpu.supports_dequantize))


_register_builtin()

__all__ = ["Backend", "Int4Weight", "available_ops", "backend_for", "call", "get", "reference_of", "register"]
