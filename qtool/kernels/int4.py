"""Packed int4 weights (W4, grouped) and their pure-torch reference ops.

`Int4Weight` is the one layout every backend starts from: compressed-tensors' `pack-quantized`
layout, which GPTQ folders are re-packed into on load (same bytes per weight):

* `packed`  int32 [out, in/8]: nibble i (bits 4i..4i+3) of word j holds the unsigned code
  q + 8 of input column 8j + i, q the signed code in [-8, 7];
* `scale`   [out, in/group_size] in the checkpoint's float dtype;
* `zero`    int8 [out, in/group_size] signed zero points, or None (symmetric);
* W = (q - zero) * scale, computed in float32 (exactly `QuantizedWeight.dequantize`).

Backends may cache a re-packed form of their own on the weight (`prepared`), never a dense copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qtool.errors import UnsupportedError

PACK = 8  # nibbles per int32 word


@dataclass(eq=False)
class Int4Weight:
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    in_features: int
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def prepared(self, key: str, build: Callable[["Int4Weight"], Any]) -> Any:
        """A backend's own form of this weight, built once and kept beside it."""
        if key not in self.cache:
            self.cache[key] = build(self)
        return self.cache[key]

    def to(self, device: torch.device | str) -> "Int4Weight":
        zero = None if self.zero is None else self.zero.to(device)
        return Int4Weight(self.packed.to(device), self.scale.to(device), zero, self.group_size, self.in_features)

    def nbytes(self) -> int:
        ts = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    @classmethod
    def from_qweight(cls, qw) -> "Int4Weight":
        """A QuantizedWeight of int4 codes (per channel, or groups that tile the row; no act-order
        g_idx) -> the packed layout. Anything else is refused: the caller keeps a dense weight."""
        from qtool.core.packing import pack_bits

        out, cols = qw.shape
        if qw.qtype.name != "int4" or qw.g_idx is not None or qw.strategy not in ("group", "channel"):
            raise UnsupportedError(f"int4 kernels take int4 group/channel weights without g_idx, not "
                                   f"{qw.qtype.name} {qw.strategy}{' with g_idx' if qw.g_idx is not None else ''}")
        g = cols if qw.strategy == "channel" else int(qw.group_size)
        if cols % PACK or cols % g or g % PACK:
            raise UnsupportedError(f"int4 kernels need in_features ({cols}) divisible by the group size {g}, "
                                   "both multiples of 8")
        packed = pack_bits((qw.codes.to(torch.int16) + 8).to(torch.uint8), 4, dim=1)
        zero = None if qw.zero_point is None else qw.zero_point.to(torch.int8).reshape(out, -1).contiguous()
        return cls(packed, qw.scale.reshape(out, -1).contiguous(), zero, g, cols)


def unpack_codes(w: Int4Weight) -> torch.Tensor:
    """Signed codes int8 [out, in] of a packed weight (reference: shifts and masks in torch)."""
    shifts = torch.arange(0, 32, 4, device=w.device, dtype=torch.int32)
    nibbles = (w.packed.unsqueeze(-1) >> shifts) & 0xF  # [out, in/8, 8]
    return (nibbles.reshape(w.out_features, w.in_features) - 8).to(torch.int8)


def dequantize_reference(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = (q - zero) * scale in float32, then cast: [out, in]."""
    q = unpack_codes(w).to(torch.float32).reshape(w.out_features, -1, w.group_size)
    if w.zero is not None:
        q = q - w.zero.to(torch.float32).unsqueeze(-1)
    return (q * w.scale.to(torch.float32).unsqueeze(-1)).reshape(w.out_features, w.in_features).to(dtype)


def linear_reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + b in x's dtype (the dense weight lives for this call only)."""
    return torch.nn.functional.linear(x, dequantize_reference(w, x.dtype), None if bias is None else bias.to(x.dtype))
