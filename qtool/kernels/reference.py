"""Pure-torch reference kernels. Slow and obviously right: the baseline every backend matches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # no import of qtool at load time: this package must import on its own
    from qtool.core.qweight import QuantizedWeight


def qlinear(x: torch.Tensor, qw: "QuantizedWeight", bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + b, computed in x's dtype."""
    w = qw.dequantize(torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
