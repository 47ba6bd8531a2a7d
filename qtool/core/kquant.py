"""llama.cpp's K super-block grids (Q2_K..Q6_K) as plain tensors, for methods that tune on them.

A K type cuts each row into super-blocks of 256 weights and those into sub-blocks of `sub` (16 or
32) weights. Each sub-block has an integer scale `sc` (and, asymmetric types, an integer min `m`)
of `smax + 1` levels under one fp16 super-block scale d (and dmin). Decoding, as gguf-py's
`dequantize_blocks` and llama.cpp's `dequantize_row_*_K` compute it in float32:

    asymmetric (Q2_K, Q4_K, Q5_K):  y = (d·sc)·L − (dmin·m),   L ∈ [0, nmax]
    symmetric  (Q3_K, Q6_K):        y = (d·sc)·(L − off),       sc signed

`KScales` holds one weight's (d, sc, dmin, m); `KScales.dequantize(L)` is that formula, bit for bit.
`quantize_scales` turns float sub-block scales/mins into them the way llama.cpp's
`quantize_row_*_K_ref` does (the largest sub-block scale sets d: d = fp16(max / smax),
sc = nearest_int(smax / max · s); symmetric types with the signed peak, Q6_K's −128 / max and
Q3_K's −32 / max). The GGUF writer packs these decompositions into the block bytes; reading
block bytes back is `from_ggml` (the ground truth the tests compare with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class KGrid:
    """One K type's grid: the codes L ∈ [0, nmax]; symmetric types decode L − off."""

    name: str
    sub: int  # sub-block width
    nmax: int
    asym: bool
    smax: int  # asym: sub-block scale/min levels 0..smax; sym: |sc| bound of the quantized peak
    off: int = 0
    block_bytes: int = 0  # bytes per super-block

    @property
    def nsub(self) -> int:
        return QK_K // self.sub


K_GRIDS = {
    "Q2_K": KGrid("Q2_K", 16, 3, True, 15, 0, 84),
    "Q3_K": KGrid("Q3_K", 16, 7, False, 32, 4, 110),
    "Q4_K": KGrid("Q4_K", 32, 15, True, 63, 0, 144),
    "Q5_K": KGrid("Q5_K", 32, 31, True, 63, 0, 176),
    "Q6_K": KGrid("Q6_K", 16, 63, False, 128, 32, 210),
}


@dataclass
class KScales:
    """One weight's K scales: d, dmin [rows, n_super] float32 holding fp16 values; sc, m
    [rows, n_super * nsub] float32 holding integers (sym types: m, dmin None)."""

    grid: KGrid
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None

    def d1(self) -> torch.Tensor:
        """Per sub-block scale d·sc [rows, n_sub] (float32, as the decoders round it)."""
        return self.d.repeat_interleave(self.grid.nsub, 1) * self.sc

    def m1(self) -> torch.Tensor | None:
        return None if self.m is None else self.dmin.repeat_interleave(self.grid.nsub, 1) * self.m  # type: ignore[union-attr]

    def dequantize(self, L: torch.Tensor) -> torch.Tensor:
        """L [rows, cols] codes 0..nmax -> weights float32, the decoders' arithmetic."""
        rows, cols = L.shape
        q = L.to(torch.float32).view(rows, -1, self.grid.sub)
        if not self.grid.asym:
            q = q - float(self.grid.off)
        y = self.d1().unsqueeze(-1) * q
        m1 = self.m1()
        if m1 is not None:
            y = y - m1.unsqueeze(-1)
        return y.view(rows, cols)

    def rows(self, fn) -> "KScales":
        """The same scales with `fn` applied to every row-indexed tensor (a slice, a permutation)."""
        opt = (lambda t: None if t is None else fn(t))
        return KScales(self.grid, fn(self.d), fn(self.sc), opt(self.dmin), opt(self.m))

    def to(self, device) -> "KScales":
        return self.rows(lambda t: t.to(device))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def quantize_scales(grid: KGrid, s: torch.Tensor, mins: torch.Tensor | None = None) -> KScales:
    """Float sub-block scales s (and mins, asymmetric) [rows, n_super, nsub] -> KScales, as
    llama.cpp's reference quantizers do it (no importance matrix)."""
    rows = s.shape[0]
    if grid.asym:
        def level(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mx = v.amax(-1).clamp(min=0)
            inv = torch.where(mx > 0, grid.smax / torch.where(mx > 0, mx, 1.0), torch.zeros_like(mx))
            q = torch.round(inv.unsqueeze(-1) * v).clamp_(0, grid.smax)
            return _fp16(mx / grid.smax), q

        d, sc = level(s)
        dmin, m = level(mins)  # type: ignore[arg-type]
        return KScales(grid, d, sc.reshape(rows, -1), dmin, m.reshape(rows, -1))
    idx = s.abs().argmax(-1, keepdim=True)
    peak = s.gather(-1, idx).squeeze(-1)  # the signed largest scale
    zero = peak.abs() < 1e-15
    iscale = torch.where(zero, torch.zeros_like(peak), -float(grid.smax) / torch.where(zero, 1.0, peak))
    lo, hi = (-128, 127) if grid.smax == 128 else (-32, 31)
    sc = torch.round(iscale.unsqueeze(-1) * s).clamp_(lo, hi)
    d = torch.where(zero, torch.zeros_like(peak), _fp16(1.0 / torch.where(zero, 1.0, iscale)))
    return KScales(grid, d, torch.where(zero.unsqueeze(-1), 0.0, sc).reshape(rows, -1))


def from_ggml(data, grid: KGrid, rows: int, cols: int) -> tuple[KScales, torch.Tensor]:
    """Block bytes of a K type ([rows, bytes] uint8 as llama.cpp stores them) -> (KScales, L),
    read with gguf-py's own decoders for the scales (so the bytes are the ground truth)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants as gq

    blocks = np.asarray(data, dtype=np.uint8).reshape(rows * (cols // QK_K), -1)
    n = blocks.shape[0]
    f16 = lambda b: torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32)).reshape(rows, -1)  # noqa: E731
    if grid.name in ("Q4_K", "Q5_K"):
        d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
        sc, m = gq.Q4_K.get_scale_min(blocks[:, 4:16])
        sc = torch.from_numpy(sc.astype(np.float32)).reshape(rows, -1)
        m = torch.from_numpy(m.astype(np.float32)).reshape(rows, -1)
        ks = KScales(grid, d, sc, dmin, m)
    elif grid.name == "Q2_K":
        scb = blocks[:, :16]
        d, dmin = f16(blocks[:, 80:82]), f16(blocks[:, 82:84])
        ks = KScales(grid, d, torch.from_numpy((scb & 0xF).astype(np.float32)).reshape(rows, -1), dmin,
                     torch.from_numpy((scb >> 4).astype(np.float32)).reshape(rows, -1))
    elif grid.name == "Q6_K":
        d = f16(blocks[:, 208:210])
        ks = KScales(grid, d, torch.from_numpy(blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(rows, -1))
    elif grid.name == "Q3_K":
        d = f16(blocks[:, 108:110])
        from qtool.formats.gguf.quants import _q3_scale_values

        ks = KScales(grid, d, _q3_scale_values(torch.from_numpy(blocks[:, 96:108].copy())).reshape(rows, -1))
    else:
        raise ValueError(grid.name)
    y = torch.from_numpy(gq.dequantize(blocks, getattr(T, grid.name))).reshape(rows, cols)
    # the codes: invert y = d1·(L − off) − m1 where d1 != 0 (exact: L is an integer of <= 6 bits)
    d1, m1 = ks.d1(), ks.m1()
    yy = y.view(rows, -1, grid.sub)
    if m1 is not None:
        yy = yy + m1.unsqueeze(-1)
    L = torch.where(d1.unsqueeze(-1) != 0, torch.round(yy / torch.where(d1 == 0, 1.0, d1).unsqueeze(-1)), 0.0)
    if not grid.asym:
        L = L + grid.off
    del n
    return ks, L.clamp_(0, grid.nmax).reshape(rows, cols)
