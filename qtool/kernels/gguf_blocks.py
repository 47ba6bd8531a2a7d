"""GGUF block ops' references: the pure-torch quantizers of qtool/formats/gguf/quants.py (llama.cpp's
bytes, proven against llama.cpp in tests/test_gguf_quants.py) and gguf-py's dequantization.

  gguf_quantize(x [rows, cols] float, qtype, imatrix=None) -> uint8 [rows, bytes per row]
  gguf_dequantize(data uint8 [..., bytes per row], qtype) -> float32 [..., cols]
  gguf_quantize_error(x, qtype, imatrix=None) -> (bytes, (sum x^2, sum (x - dequantized)^2))

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


def quantize_error_reference(x, qtype, imatrix=None):
    """(bytes, (|x|^2, |x - dequantized|^2)): the quantizer and its error figure in one op."""
    import torch

    data = quantize_reference(x, qtype, imatrix)
    xf = x.float()
    recon = torch.from_numpy(dequantize_reference(data, qtype)).reshape(xf.shape)
    return data, (torch.linalg.vector_norm(xf).item() ** 2, torch.linalg.vector_norm(xf - recon).item() ** 2)
