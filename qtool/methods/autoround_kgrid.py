"""Learned rounding on a GGUF K type's own grid (Q2_K..Q6_K: super-blocks of 256, quantized
sub-block scales and mins; qtool.core.kquant).

Start: llama.cpp's own quantization of the weight (quants.quantize_tensor, `llama-quantize` without
an importance matrix), read back into per-sub-block float scales s0 = d·sc and mins m0 = dmin·m.
Trainable, per linear: the rounding offsets V (one per weight, in [-0.5, 0.5]) and one factor per
sub-block on its scale (a) and, asymmetric types, on its min (b), both in [0.8, 1.2], stepping at
FACTOR_STEP x the offsets' rate (a toy linear: 0.05 ended at 15.3 MSE, 0.1 at 17.5, 0.2 at 20.5, offsets alone 17.2). Every forward
re-derives the K decomposition from s = a·s0, m = b·m0 exactly as llama.cpp's reference quantizer
does (the largest sub-block scale sets the fp16 super-block scale d = fp16(max / 63), each
sub-block's 6-bit sc = nearest_int(63 / max · s), likewise dmin and m; Q6_K/Q3_K from the signed
peak), then rounds with the offsets and decodes as llama.cpp does:

    L = clamp(round((W + dmin·m) / (d·sc) + V), 0, nmax),   Ŵ = (d·sc)·L − dmin·m
    (symmetric: L − off = clamp(round(W / (d·sc) + V)),     Ŵ = (d·sc)·(L − off))

so the sub-block scales and mins are re-searched by the tuning at every step on the quantized
super-block grid, and the forward computes Ŵ in the very float32 operations gguf-py's and
llama.cpp's decoders use: the stored file decodes to the tuned weights bit for bit. The gradient
passes straight through the roundings (of the codes and of the scales). With V = 0 and a = b = 1
the result is llama.cpp's own quantization of W (iteration 0 is round-to-nearest on the K grid).
"""

from __future__ import annotations

import torch

from qtool.core.kquant import K_GRIDS, QK_K, KScales, from_ggml, quantize_scales
from qtool.core.qweight import QuantizedWeight
from qtool.methods.autoround import Tunable
from qtool.methods.base import LayerSpec
from qtool.qtypes import QType

FACTOR_STEP = 0.05  # the factors move by FACTOR_STEP x the offsets' step (a = 1 + FACTOR_STEP * alpha); 0.1, 0.2 measured worse
ALPHA_RANGE = (-4.0, 4.0)  # a, b within 1 -/+ 0.2


class _Through(torch.autograd.Function):
    """Forward: `value` exactly; backward: the gradient goes to `x` unchanged (straight through)."""

    @staticmethod
    def forward(ctx, x, value):
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def fits(spec: LayerSpec, shape: tuple[int, ...]) -> bool:
    return spec.kgrid in K_GRIDS and len(shape) == 2 and shape[1] % QK_K == 0


class KLinearGrid(Tunable):
    """One linear on a K grid: the interface of autoround.LinearGrid (params, clamp_, qdq, result)."""

    def __init__(self, w: torch.Tensor, spec: LayerSpec) -> None:
        from qtool.formats.gguf.quants import T, quantize_tensor

        self.spec = spec
        self.grid = g = K_GRIDS[spec.kgrid]  # type: ignore[index]
        self.shape = rows, cols = tuple(w.shape)
        w32 = w.detach().to(torch.float32)
        ks, _ = from_ggml(quantize_tensor(w32.cpu(), getattr(T, g.name)), g, rows, cols)
        ks = ks.to(w.device)
        self.W = w32.reshape(rows, -1, g.sub)  # [rows, n_sub, sub]
        n_super = cols // QK_K
        self.s0 = ks.d1().view(rows, n_super, g.nsub)
        self.m0 = None if ks.m is None else ks.m1().view(rows, n_super, g.nsub)  # type: ignore[union-attr]
        self.V = torch.zeros_like(self.W)
        self.a = torch.zeros_like(self.s0)  # alpha of the scale factors (a = 1 + FACTOR_STEP * alpha)
        self.b = None if self.m0 is None else torch.zeros_like(self.m0)
        bits = max(1, (g.nmax).bit_length())
        self.qtype = QType(f"int{bits}", "int", bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8)

    def params(self) -> list[torch.Tensor]:
        return [self.V, self.a] + ([] if self.b is None else [self.b])

    def clamp_(self) -> None:
        with torch.no_grad():
            self.V.clamp_(-0.5, 0.5)
            for p in self.params()[1:]:
                p.clamp_(*ALPHA_RANGE)

    def scales(self) -> tuple[KScales, torch.Tensor, torch.Tensor | None]:
        """(the K decomposition of the current factors, d·sc [rows, n_sub] and dmin·m, each equal to
        the decomposition's values and differentiable in the factors)."""
        rows = self.shape[0]
        s = self.s0 * (1 + FACTOR_STEP * self.a)
        m = None if self.m0 is None else self.m0 * (1 + FACTOR_STEP * self.b)
        ks = quantize_scales(self.grid, s.detach(), None if m is None else m.detach())
        d1 = _Through.apply(s.reshape(rows, -1), ks.d1())
        m1 = None if m is None else _Through.apply(m.reshape(rows, -1), ks.m1())
        return ks, d1, m1

    def _codes(self, d1: torch.Tensor, m1: torch.Tensor | None, grad: bool) -> torch.Tensor:
        """L [rows, n_sub, sub] (float, integers 0..nmax), straight-through round when `grad`."""
        g = self.grid
        d = d1.unsqueeze(-1)
        u = self.W if m1 is None else self.W + m1.unsqueeze(-1)
        u = u / torch.where(d == 0, torch.ones_like(d), d) + self.V + float(g.off)
        r = torch.round(u.detach())
        L = (_Through.apply(u, r) if grad else r).clamp(0, g.nmax)
        return torch.where(d == 0, torch.full_like(L, float(g.off)), L)  # a zero sub-block decodes to -m1 / 0

    def qdq(self, fused: bool = True) -> torch.Tensor:
        """Ŵ [out, in] float32, the K decoders' arithmetic (`fused` is accepted for the interface)."""
        _, d1, m1 = self.scales()
        L = self._codes(d1, m1, grad=True)
        q = L if self.grid.asym else L - float(self.grid.off)
        y = d1.unsqueeze(-1) * q
        if m1 is not None:
            y = y - m1.unsqueeze(-1)
        return y.reshape(self.shape)

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        ks, d1, m1 = self.scales()
        L = self._codes(d1, m1, grad=False).reshape(self.shape)
        codes = (L + self.qtype.qmin).to(torch.int8).contiguous()
        return QuantizedWeight(self.qtype, codes, ks.d1(), None, "group", self.grid.sub, kblock=ks)
