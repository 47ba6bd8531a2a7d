"""The one table of quantized types: bit-widths, ranges and kinds. Everything else derives from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.errors import UsageError


@dataclass(frozen=True)
class QType:
    name: str  # CLI spelling
    kind: str  # "int", "float", or "lut" (a code indexes a table of `levels`, scaled per block)
    bits: int
    qmin: float  # smallest code (signed convention for ints: -2^(b-1))
    qmax: float
    torch_dtype: torch.dtype  # dtype the unpacked codes are held in
    # symmetric grids: scale = the group's largest-magnitude value / qmin (may be negative), so it
    # lands on qmin exactly (llama.cpp's Q4_0/Q5_0 rule), instead of max|w| / ((qmax - qmin) / 2).
    # Only the GGUF writer's grids set it; the `--qtype` values keep compressed-tensors' rule.
    signed_scale: bool = False
    # "lut" types: the 2^bits values a code stands for, in [-1, 1] (W = levels[code] * absmax of its block)
    levels: tuple[float, ...] | None = None
    default_group: int | None = None  # "lut" types are blockwise: the block when `--group-size channel`

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The `levels` of a lookup-table type as float32 [2^bits]."""
        assert self.levels is not None, f"{self.name} is not a lookup-table type"
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    @property
    def is_int(self) -> bool:
        return self.kind == "int"


def _int(bits: int) -> QType:
    return QType(f"int{bits}", "int", bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8)


# bitsandbytes' 4-bit tables (Dettmers et al., "QLoRA", 2023, appendix E for NF4: quantiles of
# N(0, 1) scaled to [-1, 1], with an exact zero; FP4: sign + 2-bit exponent + 1-bit mantissa with
# bitsandbytes' own exponent bias, normalised by its largest value). The values are float32 as
# bitsandbytes stores them in `quant_map`; tests/test_bnb_format.py checks them against its tables.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_LEVELS = tuple(
    s * v / 12.0 for s in (1.0, -1.0) for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)


def _lut(name: str, levels: tuple[float, ...]) -> QType:
    return QType(name, "lut", 4, -1.0, 1.0, torch.uint8, levels=levels, default_group=64)


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _int(8),
        _int(4),
        _int(3),
        _int(2),
        _int(6),  # 6, 5 and 1 bits: HQQ's widths (-m hqq); any integer-holding format may take them
        _int(5),
        _int(1),
        QType("fp8_e4m3", "float", 8, -448.0, 448.0, torch.float8_e4m3fn),
        _lut("nf4", NF4_LEVELS),
        _lut("fp4", FP4_LEVELS),
    )
}

# What `--bits` means when no `--qtype` is given.
BITS_TO_QTYPE = {8: "int8", 4: "int4", 3: "int3", 2: "int2", 6: "int6", 5: "int5", 1: "int1"}


def get_qtype(name: str) -> QType:
    key = name.strip().lower().replace("-", "_")
    key = {"fp8": "fp8_e4m3", "float8": "fp8_e4m3", "e4m3": "fp8_e4m3"}.get(key, key)
    if key not in QTYPES:
        raise UsageError(f"unknown weight type {name!r}; choose one of: {', '.join(QTYPES)}")
    return QTYPES[key]
