"""The one table of quantized types: bit-widths, ranges and kinds. Everything else derives from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.errors import UsageError


@dataclass(frozen=True)
class QType:
    name: str  # CLI spelling
    kind: str  # "int" or "float"
    bits: int
    qmin: float  # smallest code (signed convention for ints: -2^(b-1))
    qmax: float
    torch_dtype: torch.dtype  # dtype the unpacked codes are held in
    # symmetric grids: scale = the group's largest-magnitude value / qmin (may be negative), so it
    # lands on qmin exactly (llama.cpp's Q4_0/Q5_0 rule), instead of max|w| / ((qmax - qmin) / 2).
    # Only the GGUF writer's grids set it; the `--qtype` values keep compressed-tensors' rule.
    signed_scale: bool = False

    @property
    def is_int(self) -> bool:
        return self.kind == "int"


def _int(bits: int) -> QType:
    return QType(f"int{bits}", "int", bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8)


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
