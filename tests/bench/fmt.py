"""Cell formatting shared by the bench sections' markdown tables."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def size(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"
