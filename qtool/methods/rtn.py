"""Round-to-nearest: data-free, one pass over each weight (see core/affine.py for the grid)."""

from __future__ import annotations

import torch

from qtool.core.affine import quantize_float8, quantize_float8_blocks, quantize_int
from qtool.core.lut import quantize_lut, with_double_quant
from qtool.core.peer_rtn import ROUNDINGS, quantize_like
from qtool.core.qweight import QuantizedWeight
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec, QuantMethod


@METHODS.register("rtn", aliases=("round-to-nearest",))
class RTNMethod(QuantMethod):
    """Round to nearest on a min/max grid (lookup-table types: the nearest level); no calibration data.
    A format may ask for its runtime's own arithmetic (LayerSpec.rounding: core/peer_rtn.py)."""

    supported_kinds = ("int", "float", "lut")

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        if spec.qtype.kind == "lut":
            qw = quantize_lut(w, spec.qtype, spec.group_size)  # type: ignore[arg-type]
            return with_double_quant(qw, rounding=spec.rounding) if spec.double_quant else qw
        if spec.rounding in ROUNDINGS:
            return quantize_like(spec.rounding, w, spec.qtype, spec.strategy, spec.group_size, spec.symmetric, spec.scale_dtype)
        if spec.strategy == "block":
            return quantize_float8_blocks(w, spec.qtype, spec.block, scale_dtype=spec.scale_dtype)  # type: ignore[arg-type]
        if spec.qtype.is_int:
            return quantize_int(w, spec.qtype, strategy=spec.strategy, group_size=spec.group_size, symmetric=spec.symmetric,
                                scale_dtype=spec.scale_dtype)
        return quantize_float8(w, spec.qtype, strategy=spec.strategy, scale_dtype=spec.scale_dtype)
