"""CPU backend for the int4 linear: ATen's own W4 kernel (`_weight_int4pack_mm_for_cpu`, the one
torchao's int4 CPU path uses), where it beats dequantize + matmul.

Its weight is re-packed once per weight (`Int4Weight.prepared`: uint8 [out, in/2], the same size
as ours) and its affine form is W = (u - 8) * s + m with u the unsigned nibble; ours is
W = (u - 8 - z) * s, so m = -z * s. The ATen kernel takes group sizes 32..256 and works in the
activation's dtype; measured on a 2-core x86 box (2304×1536, g128): bf16 activations 5x faster
than the reference at 1 and at 512 rows, float32 2x faster at 1 row but far slower at 512, so
float32 batches of more than `FP32_MAX_ROWS` rows stay on the reference.
"""

from __future__ import annotations

import torch

from qtool.kernels.int4 import Int4Weight, unpack_codes

GROUP_SIZES = (32, 64, 128, 256)
FP32_MAX_ROWS = 16


def available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def supports(x: torch.Tensor, w: Int4Weight, *_: object, **__: object) -> bool:
    if x.device.type != "cpu" or w.group_size not in GROUP_SIZES or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return x.dtype != torch.float32 or rows <= FP32_MAX_ROWS


def _prepare(w: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    unsigned = (unpack_codes(w).to(torch.int32) + 8).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scale = w.scale.to(torch.float32)
    shift = torch.zeros_like(scale) if w.zero is None else -w.zero.to(torch.float32) * scale
    scales_and_zeros = torch.stack([scale.t(), shift.t()], dim=-1).to(dtype).contiguous()  # [groups, out, 2]
    return packed, scales_and_zeros


def linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    packed, sz = w.prepared(f"cpu-int4pack-{x.dtype}", lambda w: _prepare(w, x.dtype))
    lead = x.shape[:-1]
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), packed, w.group_size, sz)
    y = y.reshape(*lead, w.out_features)
    return y if bias is None else y + bias.to(y.dtype)
