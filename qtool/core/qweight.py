"""The one object every method returns: an *unpacked* quantized weight.

Codes are held one per element (int8 for integer types, in the signed range [qmin, qmax]; float8
for fp8; uint8 table indices for lookup-table types such as NF4), with scales and zero points per
(row, group), or per 2-D block ("block" strategy: fine-grained FP8's 128 x 128 tiles). Writers do
all packing, offsetting and renaming for their consumer; `dequantize()` is the plain-torch
reference everybody agrees with.

Scales that are themselves quantized (bitsandbytes' double quantization) keep their dequantized
values in `scale`, the stored decomposition in `nested` (`NestedScale.dequantize()` == `scale`).

Zero points are int8 codes on the signed grid, or (HQQ) floating point on the same signed grid:
W = (q - z) * s either way. A writer whose format holds only integer zeros sets nothing and the
pipeline hands it `with_integer_zeros()` (rounded, the loss reported); one that holds float zeros
(offsets, shifts, K-type mins) sets `FormatWriter.float_zero_points`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qtool.core.grouping import column_groups
from qtool.core.kquant import KScales
from qtool.qtypes import QType


@dataclass
class NestedScale:
    """8-bit codes of a weight's scales, taken flat (row-major) in blocks of `block`:
    scale = table[code] * absmax[block] + offset, computed in float32."""

    codes: torch.Tensor  # [n] uint8
    absmax: torch.Tensor  # [ceil(n / block)] float32
    table: torch.Tensor  # [256] float32
    offset: float
    block: int

    def dequantize(self) -> torch.Tensor:
        vals = self.table[self.codes.long()]
        per = self.absmax.repeat_interleave(self.block)[: vals.numel()]
        return vals * per + torch.tensor(self.offset, dtype=torch.float32)

    def storage_bits(self) -> int:
        return self.codes.numel() * 8 + (self.absmax.numel() + self.table.numel() + 1) * 32


@dataclass
class QuantizedWeight:
    qtype: QType
    codes: torch.Tensor  # [out, in]; int8 signed codes, or float8
    scale: torch.Tensor  # [out, n_groups] ("tensor" strategy: [1, 1]); in the checkpoint dtype
    zero_point: torch.Tensor | None  # [out, n_groups] int8 signed codes (or float, HQQ); None when symmetric
    strategy: str  # "tensor" | "channel" | "group"
    group_size: int | None = None  # for "group"; the last group may be partial
    g_idx: torch.Tensor | None = None  # [in] group of each input column when not j // group_size (act-order)
    block: tuple[int, int] | None = None  # "block" strategy: (rows, cols) per scale; scale [ceil(out/r), ceil(in/c)]
    nested: NestedScale | None = None  # how `scale` is stored when it is itself quantized
    # a GGUF K type's decomposition (learned rounding on the K grid): codes are L + qmin, `scale` the
    # sub-block scales d·sc, zero_point None, and dequantize() is the K decoders' arithmetic
    kblock: KScales | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def float_zeros(self) -> bool:
        """Zero points that are not integers' codes (HQQ's half-quadratic solver finds real ones)."""
        return self.zero_point is not None and self.zero_point.is_floating_point()

    def with_integer_zeros(self, w: torch.Tensor | None = None) -> "QuantizedWeight":
        """What a format that stores integer zeros can hold of a float-zero weight: the nearest
        integer zero points, and the codes re-rounded for them from the original weight `w`
        (without `w`, the codes stay: a constant shift of up to s/2 per group)."""
        if not self.float_zeros:
            return self
        z = self.zero_point.float().round().clamp(self.qtype.qmin, self.qtype.qmax)  # type: ignore[union-attr]
        codes = self.codes
        if w is not None:
            idx = self.group_index()
            q = w.to(torch.float32) / self.scale.float()[:, idx] + z[:, idx]
            codes = q.round_().clamp_(self.qtype.qmin, self.qtype.qmax).to(torch.int8)
        return replace(self, codes=codes, zero_point=z.to(torch.int8))

    @property
    def n_groups(self) -> int:
        return self.scale.shape[-1]

    def group_index(self) -> torch.Tensor:
        """[in] -> index of the scale column that applies to each input column."""
        return column_groups(self.shape[1], self.strategy, self.group_size, self.g_idx, self.codes.device)

    def values(self) -> torch.Tensor:
        """The codes as the float32 numbers they stand for (before scaling)."""
        if self.qtype.kind == "lut":
            return self.qtype.table(self.codes.device)[self.codes.long()]
        return self.codes.to(torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reference dequantization, computed in float32: W = (q - z) * s (lookup-table types:
        q = levels[code])."""
        out, cols = self.shape
        if self.kblock is not None:
            return self.kblock.dequantize(self.codes.to(torch.int32) - self.qtype.qmin).to(dtype or torch.float32)
        q = self.values()
        if self.strategy == "block":
            r, c = self.block  # type: ignore[misc]
            s = self.scale.to(torch.float32).repeat_interleave(r, 0)[:out].repeat_interleave(c, 1)[:, :cols]
            return (q * s).to(dtype or self.scale.dtype)
        if self.g_idx is None and (self.strategy != "group" or cols % self.group_size == 0):  # type: ignore[operator]
            # Whole groups: broadcast scales over a [out, groups, k] view instead of gathering.
            q = q.reshape(out if self.strategy != "tensor" else 1, self.n_groups, -1)
            if self.zero_point is not None:
                q = q - self.zero_point.to(torch.float32).unsqueeze(-1)
            w = (q * self.scale.to(torch.float32).unsqueeze(-1)).reshape(out, cols)
        else:
            idx = self.group_index()
            if self.zero_point is not None:
                q = q - self.zero_point.to(torch.float32)[:, idx]
            w = q * self.scale.to(torch.float32)[:, idx]
        return w.to(dtype or self.scale.dtype)

    def storage_bits(self) -> int:
        """Bits this weight needs when stored densely: codes + scales + zero points."""
        if self.kblock is not None:
            return self.codes.numel() // 256 * self.kblock.grid.block_bytes * 8
        bits = self.codes.numel() * self.qtype.bits
        bits += self.nested.storage_bits() if self.nested is not None else self.scale.numel() * self.scale.element_size() * 8
        if self.zero_point is not None:
            # float zero points (HQQ's) are stored at the scale's width (hqq, quanto's float shift)
            per = self.scale.element_size() * 8 if self.float_zeros else self.qtype.bits
            bits += self.zero_point.numel() * per
        return bits


def dequantized_state(qws: dict[str, QuantizedWeight], rest: dict[str, torch.Tensor],
                      dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """A reader's ({module: QuantizedWeight}, {name: other tensor}) -> a plain state dict:
    `module.weight` dequantized, float tensors cast to `dtype` (None: kept as stored)."""
    state = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t) for k, t in rest.items()}
    for module, qw in qws.items():
        state[f"{module}.weight"] = qw.dequantize(dtype)
    return state
