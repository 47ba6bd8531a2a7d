"""What a quantization method is: a class registered under its CLI name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from qtool.core.qweight import QuantizedWeight
from qtool.qtypes import QType


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is to be quantized, after the format adapted the recipe to its shape."""

    name: str
    qtype: QType
    strategy: str
    group_size: int | None
    symmetric: bool
    scale_dtype: torch.dtype | None = None  # dtype the scales are stored in; None: the weight's own


class QuantMethod(ABC):
    registry_name: str
    needs_calibration: bool = False
    supported_kinds: tuple[str, ...] = ("int", "float")
    always_asymmetric: bool = False  # its grid has zero points whatever --asym says (HQQ)

    @abstractmethod
    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        """Quantize one 2-D weight [out, in]; returns the unpacked result."""
