"""Round-to-nearest: data-free, one pass over each weight (see core/affine.py for the grid)."""

from __future__ import annotations

import torch

from qtool.core.affine import quantize_float8, quantize_int
from qtool.core.qweight import QuantizedWeight
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec, QuantMethod


@METHODS.register("rtn", aliases=("round-to-nearest",))
class RTNMethod(QuantMethod):
    """Round to nearest on a min/max grid; no calibration data."""

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        if spec.qtype.is_int:
            return quantize_int(w, spec.qtype, strategy=spec.strategy, group_size=spec.group_size, symmetric=spec.symmetric,
                                scale_dtype=spec.scale_dtype)
        return quantize_float8(w, spec.qtype, strategy=spec.strategy, scale_dtype=spec.scale_dtype)
