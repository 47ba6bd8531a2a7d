"""HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023): data-free, asymmetric, 1-8 bits.

Per group, a min/max grid is refined by a half-quadratic (proximal) solver that minimises the
sparsity-promoting lp-norm (p < 1) of the quantization error ||W - (Q - z)/s||_p^p over the zero
point z, which stays a *real* number (not an integer code). The settings are those of hqq 0.2.8's
`BaseQuantizeConfig(nbits, group_size)` (what `AutoHQQHFModel.quantize_model` and transformers'
HqqConfig run): axis=1 (groups along the input dimension), optimize=True, and round_zero=True at
4 bits only (the min/max zero point is rounded to an integer before the solver starts). The solver
is `Quantizer.optimize_weights`, i.e. `optimize_weights_proximal_legacy` with its defaults
(lp_norm 0.7, beta 10, up to 20 iterations); each iteration:

  Q   = clamp(round(W*s + z), 0, 2^b - 1)          s is the inverse scale (quantize by multiplying)
  W_r = (Q - z) / s
  W_e = shrink_p(W - W_r, beta)                     generalised soft-thresholding, p = 0.7
  z   = mean_g(Q - (W - W_e) * s)                   closed-form zero point per group

stopping at the first iteration whose mean absolute error (over the whole tensor) is not below the
best so far; as in hqq, the zero point that step produced is the one kept. beta stays 10: the
legacy solver takes a `kappa` (1.01) in its options but never applies it. Only z moves; the scale
is min/max's. Codes, zero points and scales equal hqq's `HQQLinear(layer, BaseQuantizeConfig(...))`
bit for bit on float32 weights (tests/test_hqq.py runs hqq itself), all arithmetic in float32.

In qtool's signed convention (core/qweight.py) the unsigned codes and zero points are shifted by
-2^(b-1), so W = (q - z) * s holds with q = Q - 2^(b-1), z = z_hqq - 2^(b-1), s = 1 / s_hqq.
"""

from __future__ import annotations

import torch

from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec, QuantMethod

HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)  # hqq's Quantizer.SUPPORTED_BITS, less the ternary 1.58
LP_NORM, BETA, ITERS = 0.7, 10.0, 20  # hqq's defaults (optimize_weights_proximal_legacy's opt_params)
ROUND_ZERO_BITS = (4,)  # BaseQuantizeConfig: round_zero = (nbits == 4)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: sign(x) * relu(|x| - |x|^(p-1) / beta) (p = 1: plain soft)."""
    a = x.abs()
    thr = 1.0 / beta if p == 1 else (1.0 / beta) * a.pow(p - 1)
    return torch.sign(x) * (a - thr).clamp_min(0.0)


def initial_grid(groups: torch.Tensor, bits: int, round_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float32 -> min/max inverse scale and zero [n, 1], with hqq's guards (flat groups get
    s = 1; s <= 2e4 so that half precision holds it); `round_zero`: the zero rounded to an integer."""
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    qmax = float(2**bits - 1)
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), qmax / denom).clamp(max=2e4)
    zero = -lo * inv
    return inv, torch.round(zero) if round_zero else zero


def solve_zero(groups: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, bits: int,
               lp_norm: float = LP_NORM, beta: float = BETA, iters: int = ITERS) -> torch.Tensor:
    """The half-quadratic iterations over the zero point (module docstring); returns z [n, 1]."""
    qmax = float(2**bits - 1)
    best = float("inf")
    for _ in range(iters):
        q = torch.round(groups * inv + zero).clamp_(0.0, qmax)
        err = groups - (q - zero) / inv
        zero = torch.mean(q - (groups - shrink_lp(err, beta, lp_norm)) * inv, dim=1, keepdim=True)
        current = float(err.abs().mean())
        if current < best:
            best = current
        else:
            break  # hqq keeps the zero point of this (non-improving) step
    return zero


def hqq_groups(groups: torch.Tensor, bits: int, optimize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, k] float32 groups -> (unsigned codes [n, k] float, inverse scale [n, 1], zero [n, 1])."""
    inv, zero = initial_grid(groups, bits, round_zero=bits in ROUND_ZERO_BITS)
    if optimize:
        zero = solve_zero(groups, inv, zero, bits)
    q = torch.round(groups * inv + zero).clamp_(0.0, float(2**bits - 1))
    return q, inv, zero


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int | None, scale_dtype: torch.dtype | None = None,
                 optimize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> signed codes int8 [out, in], scale [out, G] (scale_dtype, default the weight's)
    and float32 zero [out, G] (qtool's convention).

    group_size None: one group per row. A partial last group is solved on its own (hqq itself
    needs groups that tile the rows)."""
    out, cols = w.shape
    g = group_size or cols
    full = cols - cols % g
    parts = [(0, full, g)] + ([(full, cols, cols - full)] if full < cols else [])
    codes, scales, zeros = [], [], []
    for a, b, k in parts:
        if b <= a:
            continue
        groups = w[:, a:b].to(torch.float32).reshape(-1, k)
        q, inv, zero = hqq_groups(groups, bits, optimize)
        codes.append(q.reshape(out, b - a))
        scales.append((1.0 / inv).reshape(out, -1))
        zeros.append(zero.reshape(out, -1))
    offset = float(2 ** (bits - 1))
    sdtype = scale_dtype or w.dtype
    # zero points stay float32 here: a format stores them at its own width (hqq: the scale's dtype, as
    # hqq's own quantize + save does, so that a bf16 file holds hqq's very bf16 zeros)
    return ((torch.cat(codes, 1) - offset).to(torch.int8), torch.cat(scales, 1).to(sdtype),
            torch.cat(zeros, 1) - offset)


@METHODS.register("hqq", aliases=("half-quadratic",))
class HQQMethod(QuantMethod):
    """Half-quadratic zero-point optimisation on a min/max grid (data-free; float zero points)."""

    supported_kinds = ("int",)
    always_asymmetric = True

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        bits = spec.qtype.bits
        if bits not in HQQ_BITS:
            raise UnsupportedError(f"--method hqq: {bits}-bit is not an HQQ width; it takes {', '.join(map(str, HQQ_BITS))}")
        if spec.strategy == "tensor":
            raise UnsupportedError("--method hqq quantizes per channel or per group, not per tensor")
        g = spec.group_size if spec.strategy == "group" else None
        codes, scale, zero = hqq_quantize(w, bits, g, spec.scale_dtype)
        return QuantizedWeight(spec.qtype, codes, scale, zero, spec.strategy, g)
