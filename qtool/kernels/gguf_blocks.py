"""GGUF block ops' references: the pure-torch quantizers of qtool/formats/gguf/quants.py (llama.cpp's
bytes, proven against llama.cpp in tests/test_gguf_quants.py) and gguf-py's dequantization.

  gguf_quantize(x [rows, cols] float, qtype, imatrix=None) -> uint8 [rows, bytes per row]
  gguf_dequantize(data uint8 [..., bytes per row], qtype) -> float32 [..., cols]

The CPU backend is `ggml_cpu.py` (C, `_ggml_blocks.c`), held byte-equal to these in
tests/test_kernels_gguf.py.
"""

from __future__ import annotations


def quantize_reference(x, qtype, imatrix=None):
    from qtool.formats.gguf.quants import quantize_tensor

    return quantize_tensor(x, qtype, imatrix=imatrix)


def dequantize_reference(data, qtype):
    import gguf
    import numpy as np

    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
