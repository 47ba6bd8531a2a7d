"""Round-to-nearest quantization on an affine grid, and float8. Pure torch, vectorised over groups.

Grid conventions follow compressed-tensors (so our codes equal theirs):
  symmetric:  s = max|w| / ((qmax - qmin) / 2),  z = 0
  asymmetric: s = (max(w,0) - min(w,0)) / (qmax - qmin),  z = clamp(round(qmin - min/s))
  q = clamp(round(w / s + z), qmin, qmax);  w' = (q - z) * s
Scales are rounded to the checkpoint dtype *before* the codes are computed, so that the codes are
optimal for the scale actually stored.
"""

from __future__ import annotations

import torch

from qtool.core.grouping import to_groups
from qtool.core.qweight import QuantizedWeight
from qtool.qtypes import QType


def _group_view(w: torch.Tensor, strategy: str, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out|1, n_groups, k] view over which one scale applies."""
    if strategy == "group":
        return to_groups(w, group_size)  # type: ignore[arg-type]
    if strategy == "channel":
        return w.unsqueeze(1)
    if strategy == "tensor":
        return w.reshape(1, 1, -1)
    raise ValueError(f"unknown strategy {strategy!r}")


def _safe_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the storage dtype; a scale that rounds to 0 (a group of zeros) becomes 1 (its codes
    are 0 anyway). Subnormal scales stay: with float16 scales, groups of small weights (int8:
    max|w| < 7.8e-3) have subnormal scales and would otherwise be zeroed."""
    s = s.to(dtype)
    return torch.where(s == 0, torch.ones_like(s), s)


def int_qparams(
    groups: torch.Tensor, qtype: QType, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """groups [.., G, k] float32 -> scale [.., G] (scale_dtype), zero [.., G] int8 or None."""
    if symmetric and qtype.signed_scale:  # the largest-magnitude value (first on ties) maps to qmin
        peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        return _safe_scale(peak / qtype.qmin, scale_dtype), None
    lo, hi = torch.aminmax(groups, dim=-1)  # one pass
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = qtype.qmax - qtype.qmin
    if symmetric:
        scale = _safe_scale(torch.maximum(-lo, hi) / (span / 2), scale_dtype)
        return scale, None
    scale = _safe_scale((hi - lo) / span, scale_dtype)
    zero = torch.round(qtype.qmin - lo / scale.float()).clamp(qtype.qmin, qtype.qmax)
    return scale, zero.to(torch.int8)


def quantize_int(
    w: torch.Tensor,
    qtype: QType,
    *,
    strategy: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """RTN of a 2-D weight to an integer type; the last group may be partial."""
    out, cols = w.shape
    scale_dtype = scale_dtype or w.dtype
    g = _group_view(w.to(torch.float32, copy=True), strategy, group_size)
    scale, zero = int_qparams(g, qtype, symmetric, scale_dtype)
    q = g.div_(scale.float().unsqueeze(-1))  # g is our own float32 copy: work in place
    if zero is not None:
        q += zero.float().unsqueeze(-1)  # before rounding, as compressed-tensors does (ties agree)
    q = q.round_().clamp_(qtype.qmin, qtype.qmax).to(torch.int8)
    codes = q.reshape(out if strategy != "tensor" else 1, -1)[:, :cols].reshape(out, cols)
    return QuantizedWeight(qtype, codes, scale, zero, strategy, group_size if strategy == "group" else None)


def quantize_float8(w: torch.Tensor, qtype: QType, *, strategy: str = "channel", scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """float8 e4m3: s = max|w| / 448 per channel or per tensor; codes = w / s cast to float8."""
    out, cols = w.shape
    scale_dtype = scale_dtype or w.dtype
    g = _group_view(w.float(), strategy, None)
    scale = _safe_scale(g.abs().amax(-1) / qtype.qmax, scale_dtype)
    q = (g / scale.float().unsqueeze(-1)).clamp(qtype.qmin, qtype.qmax)
    codes = q.reshape(out, cols).to(qtype.torch_dtype)
    return QuantizedWeight(qtype, codes, scale, None, strategy, None)


def quantize_float8_blocks(w: torch.Tensor, qtype: QType, block: tuple[int, int], *, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """float8 with one scale per `block` tile of rows x columns (fine-grained FP8, 128 x 128):
    s = max|w| / 448 over the tile; a partial last tile is scaled over what it holds."""
    out, cols = w.shape
    r, c = block
    scale_dtype = scale_dtype or w.dtype
    pr, pc = (-out) % r, (-cols) % c
    t = torch.nn.functional.pad(w.float(), (0, pc, 0, pr)).reshape((out + pr) // r, r, (cols + pc) // c, c)
    scale = _safe_scale(t.abs().amax(dim=(1, 3)) / qtype.qmax, scale_dtype)  # [rows / r, cols / c]
    q = (t / scale.float()[:, None, :, None]).clamp(qtype.qmin, qtype.qmax)
    codes = q.reshape(out + pr, cols + pc)[:out, :cols].to(qtype.torch_dtype)
    return QuantizedWeight(qtype, codes, scale, None, "block", None, block=block)
