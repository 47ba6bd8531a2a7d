"""Round-to-nearest with a consumer library's own arithmetic, so that qtool's file holds the very
codes and scales that library computes when it quantizes the same weight itself at load time.

qtool's own RTN (core/affine.py) works in float32 on a scale already rounded to its storage dtype.
The on-the-fly libraries compute in the weight's dtype (bf16 for a bf16 checkpoint) and, for a
few percent of the values lying near a rounding boundary, land one code away from it. Neither is
better in general (the differences are below bf16's resolution), but a file that equals what the
runtime itself would build is the one whose loaded model is, bit for bit, the library's own. The
format writers ask for this through `LayerSpec.rounding` (their `spec_options`):

  "torchao"  torchao 0.18 `choose_qparams_affine` + `quantize_affine` (IntxWeightOnlyConfig,
             Int8WeightOnlyConfig) and `_choose_scale_float8` + `_quantize_affine_float8`
             (Float8WeightOnlyConfig): min/max and the scale in the weight's dtype; integer codes
             round(w * (1 / s)) + z (times the reciprocal, the zero point added after rounding);
             Int8Tensor casts its scale to float32 first (the product then runs in float32),
             intx keeps it in the weight's dtype (the product runs in bf16); scales clamped to an
             eps, not replaced.
  "quanto"   optimum-quanto 0.2.7 qint8 / qfloat8 weights (AbsmaxOptimizer + quantize_symmetric):
             s = max|w| / qmax (127, not compressed-tensors' 127.5; 448) in the weight's dtype,
             codes = round(w / s) (int8) or (w / s) cast (float8), clamped, in the weight's dtype.

An all-zero row is the one place where qtool departs: both libraries would divide by a zero
scale there (NaN codes); qtool stores scale 1 and codes 0 (the same zero weights).
bitsandbytes' own rule for double quantization lives in core/lut.py (`bnb_cpu_nearest`).
"""

from __future__ import annotations

import torch

from qtool.core.qweight import QuantizedWeight
from qtool.qtypes import QType

ROUNDINGS = ("torchao", "quanto")


def _groups(w: torch.Tensor, strategy: str, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, G, k] view in w's own dtype (groups must tile the rows: both libraries require it)."""
    out, cols = w.shape
    k = group_size if strategy == "group" else cols
    if strategy not in ("group", "channel") or cols % k:
        raise ValueError(f"peer rounding needs whole groups per row or one per channel (got {strategy} {group_size} on {cols} columns)")
    return w.reshape(out, cols // k, k)


def torchao_int(w: torch.Tensor, qtype: QType, strategy: str, group_size: int | None, symmetric: bool,
                scale_dtype: torch.dtype | None) -> QuantizedWeight:
    """torchao's affine integer quantization of `w` (in its own dtype). scale_dtype float32: the
    Int8Tensor rule (float32 eps, scale cast to float32 before quantizing); else the intx rule
    (eps = the dtype's smallest normal, scale kept in the weight's dtype)."""
    out, cols = w.shape
    g = _groups(w, strategy, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    qmin, qmax = int(qtype.qmin), int(qtype.qmax)
    int8_tensor = scale_dtype == torch.float32
    eps = torch.finfo(torch.float32).eps if int8_tensor else torch.finfo(w.dtype).smallest_normal
    if symmetric:
        scale = (torch.max(-lo, hi) / (float(qmax - qmin) / 2)).clamp(min=eps)
        zero = None
    else:
        scale = ((hi - lo) / float(qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int8)
    if int8_tensor:
        scale = scale.to(torch.float32)
    q = torch.round(g * (1.0 / scale))
    if zero is not None:
        q = q + zero
    codes = q.clamp(qmin, qmax).to(torch.int8).reshape(out, cols)
    zp = None if zero is None else zero.reshape(out, -1)
    return QuantizedWeight(qtype, codes, scale.reshape(out, -1), zp, strategy, group_size if strategy == "group" else None)


def torchao_float8(w: torch.Tensor, qtype: QType) -> QuantizedWeight:
    """torchao's Float8WeightOnlyConfig (per row): s = max|w| / 448 in the weight's dtype, stored
    float32; codes = (w in float32 / s) clamped to +-448, cast to float8."""
    s = (w.abs().amax(-1, keepdim=True) / torch.finfo(qtype.torch_dtype).max).to(torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    fmax = float(torch.finfo(qtype.torch_dtype).max)
    codes = (w.to(torch.float32) / s).clamp(-fmax, fmax).to(qtype.torch_dtype)
    return QuantizedWeight(qtype, codes, s, None, "channel", None)


def quanto_8bit(w: torch.Tensor, qtype: QType) -> QuantizedWeight:
    """optimum-quanto's qint8 / qfloat8_e4m3fn weights, per output channel, in the weight's dtype."""
    is_float = qtype.kind == "float"
    info = torch.finfo(qtype.torch_dtype) if is_float else torch.iinfo(torch.int8)
    qmax = info.max if is_float else 2 ** (qtype.bits - 1) - 1  # quanto's qint8.qmax is 127
    s = w.abs().amax(-1, keepdim=True) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    data = w / s
    if not is_float:
        data = torch.round(data)
    codes = data.clamp(min=info.min, max=info.max).to(qtype.torch_dtype)
    return QuantizedWeight(qtype, codes, s, None, "channel", None)


def quantize_like(rounding: str, w: torch.Tensor, qtype: QType, strategy: str, group_size: int | None, symmetric: bool,
                  scale_dtype: torch.dtype | None) -> QuantizedWeight:
    """RTN of `w` with `rounding`'s arithmetic (module docstring)."""
    if rounding == "torchao":
        return torchao_int(w, qtype, strategy, group_size, symmetric, scale_dtype) if qtype.is_int else torchao_float8(w, qtype)
    if rounding == "quanto":
        return quanto_8bit(w, qtype)
    raise ValueError(f"unknown rounding {rounding!r} (one of {', '.join(ROUNDINGS)})")
