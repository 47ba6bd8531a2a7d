"""Lookup-table quantization (bitsandbytes' NF4 / FP4) and 8-bit dynamic-map double quantization.

A weight is cut into blocks of `group_size` consecutive values along each row; each block keeps
its absmax (float32), and each value the index of the nearest entry of the type's 16 `levels`
(qtool/qtypes.py) to value / absmax. W' = levels[code] * absmax. This is what bitsandbytes'
`quantize_4bit` computes (its blocks run over the flattened tensor; with rows that are whole
blocks, which qtool requires, they are the same blocks).

Double quantization (Dettmers et al., "QLoRA", 2023, section 3 "Double Quantization") stores the
absmax values themselves in 8 bits: their mean is subtracted, then each block of 256 is scaled by
its own absmax and rounded to the nearest entry of the signed 8-bit "dynamic" map (Dettmers,
"8-bit Approximations for Parallelism in Deep Learning", 2016: a sign, a run of zero bits giving a
power of ten, then a linear fraction). The 4-bit codes are chosen against the unquantized absmax,
as bitsandbytes does; dequantization uses the double-quantized one. bitsandbytes' CPU kernel
(`cquantize_blockwise_cpu_fp32`, csrc/cpu_ops.cpp of 0.50) does not search the map: it reads the
code from a table of 65536 bins over [-1, 1] (`bnb_cpu_nearest`), which for values near a
midpoint between two map entries is one entry off the nearest. `double_quantize(rounding=
"bitsandbytes")` uses that table, so that the nested codes are the ones bitsandbytes itself stores.
"""

from __future__ import annotations

import torch

from qtool.core.grouping import to_groups
from qtool.core.qweight import NestedScale, QuantizedWeight
from qtool.qtypes import QType

NESTED_BLOCK = 256  # bitsandbytes' block for the absmax of the absmax


def nearest_level(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest entry of an ascending-or-not `table` for every value of `x`.

    Reference form: a full distance table; ties go to the lower index. `nearest_sorted` is the
    fast path (tests compare them)."""
    d = (x.unsqueeze(-1) - table).abs()
    return d.argmin(-1).to(torch.uint8)


def nearest_sorted(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`nearest_level` through the midpoints between sorted levels (no [.., 16] distance table).
    A value exactly on a midpoint goes to the lower level's index, as in the reference, when the
    lower level comes first in `table`; tables here have distinct levels, so only exact ties differ."""
    order = torch.argsort(table)
    s = table[order]
    mid = (s[1:] + s[:-1]) / 2
    pos = torch.bucketize(x, mid, right=False)  # x <= mid[i] -> i
    return order[pos].to(torch.uint8)


def quantize_lut(w: torch.Tensor, qtype: QType, group_size: int) -> QuantizedWeight:
    """Blockwise absmax scaling + nearest level. `w` [out, in] with in % group_size == 0."""
    out, cols = w.shape
    assert cols % group_size == 0, "lookup-table blocks must tile the rows"
    g = to_groups(w.to(torch.float32), group_size)  # [out, G, k]
    absmax = g.abs().amax(-1)  # [out, G]
    # times the reciprocal, clamped, exactly as bitsandbytes scales (x / a can round differently)
    x = (g * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp_(-1, 1)
    codes = nearest_sorted(x, qtype.table(w.device)).reshape(out, cols)
    return QuantizedWeight(qtype, codes, absmax, None, "group", group_size)


def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic quantization map, ascending, float32 [2^total_bits].

    For each decade e = 0 .. exponent_bits-1 (values in [0.1, 1] x 10^(e - exponent_bits + 1)),
    2^(e + fraction bits) linear steps, represented by the midpoints of a linspace over
    [0.1, 1]; mirrored when signed; plus 0 and 1."""
    fraction_bits = total_bits - 1 - exponent_bits  # one bit is the sign (or unused when unsigned)
    values: list[float] = []
    for e in range(exponent_bits):
        n = 2 ** (e + fraction_bits) + 1 if signed else 2 ** (e + fraction_bits + 1) + 1
        edges = torch.linspace(0.1, 1, n)
        mids = (edges[:-1] + edges[1:]) / 2
        decade = 10.0 ** (e - exponent_bits + 1)
        values += (decade * mids).tolist()  # in float32, as the map is stored
        if signed:
            values += (-decade * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


LUT_BINS = 65536  # bitsandbytes' CPU quantize_blockwise table


def bnb_cpu_nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU blockwise rule for `x` in [-1, 1] against an ascending 256-entry `table`:
    bin i of 65536 (value -1 + 2i / 65535) maps to the number of midpoints between neighbouring
    entries that lie below it; a value goes to bin trunc((x + 1) * 0.5 * 65535 + 0.5), the last
    multiply-add fused (the kernel is built with FMA), all in float32."""
    mid = 0.5 * (table[:-1] + table[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32, device=x.device)) / float(LUT_BINS - 1)
    lut = torch.searchsorted(mid.contiguous(), grid, side="left")  # count of midpoints < value
    half = (x.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 0.5
    idx = (half.to(torch.float64) * float(LUT_BINS - 1) + 0.5).to(torch.float32).to(torch.int64)  # one rounding: fma
    return lut[idx].to(torch.uint8)


def double_quantize(absmax: torch.Tensor, block: int = NESTED_BLOCK, rounding: str | None = None) -> NestedScale:
    """absmax (any shape, float32) -> its 8-bit nested quantization, flattened row-major.
    rounding "bitsandbytes": the codes of bitsandbytes' CPU kernel (`bnb_cpu_nearest`); None: the
    exact nearest map entry."""
    flat = absmax.reshape(-1).to(torch.float32)
    offset = flat.mean()
    centred = flat - offset
    n = centred.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, block)
    amax2 = blocks.abs().amax(-1)
    table = dynamic_map()
    x = (blocks * (1.0 / amax2.clamp(min=1e-38)).unsqueeze(-1)).clamp_(-1, 1)
    if rounding == "bitsandbytes":
        codes = torch.where(amax2.unsqueeze(-1) == 0, 0, bnb_cpu_nearest(x, table).to(torch.int64)).to(torch.uint8)
    else:
        codes = nearest_sorted(x, table)
    codes = codes.reshape(-1)[:n]
    return NestedScale(codes, amax2, table, float(offset), block)


def with_double_quant(qw: QuantizedWeight, block: int = NESTED_BLOCK, rounding: str | None = None) -> QuantizedWeight:
    """The same codes with their absmax stored double-quantized (`scale` becomes what a loader
    computes from the nested codes)."""
    nested = double_quantize(qw.scale, block, rounding)
    scale = nested.dequantize().reshape(qw.scale.shape)
    return QuantizedWeight(qw.qtype, qw.codes, scale, None, qw.strategy, qw.group_size, nested=nested)
