"""Dense little-endian bit packing of unsigned codes into int32 words.

Element i of each run of 32 occupies bits [i*b, (i+1)*b) of a b-word bit stream, crossing word
boundaries where b does not divide 32 (3-bit). This one layout is what both compressed-tensors'
`pack-quantized` (packed along input columns) and GPTQ's `qweight`/`qzeros` use (along rows, resp.
columns); the writers pick the axis and the signed/unsigned offset. `tests/test_packing.py` checks
it bit-exact against compressed-tensors' own packer.
"""

from __future__ import annotations

import math
import sys

import torch


def pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned integer codes in [0, 2^bits) along `dim` into int32 words.

    Output length along `dim` is ceil(n * bits / 32). Widths that divide 8 (1, 2, 4, 8) take a
    byte-filling path on little-endian hosts; `pack_bits_reference` is the general bit-stream loop it is tested against."""
    if 8 % bits or sys.byteorder != "little":
        return pack_bits_reference(values, bits, dim)
    # Widths that divide 8: fill bytes, then read each run of 4 bytes as one little-endian int32.
    per = 8 // bits
    v = values.movedim(dim, -1).to(torch.uint8)
    n = v.shape[-1]
    pad = (-n) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per)
    byte = v[..., 0].clone()
    for i in range(1, per):
        byte |= v[..., i] << (i * bits)
    out = byte.contiguous().view(torch.int32)[..., : math.ceil(n * bits / 32)]
    return out.movedim(-1, dim).contiguous()


def pack_bits_reference(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """The general packer: any width 1..8, elements crossing word boundaries where needed."""
    assert 1 <= bits <= 8
    v = values.movedim(dim, -1).to(torch.int64)
    lead, n = v.shape[:-1], v.shape[-1]
    pad = (-n) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*lead, -1, 32)  # [..., runs, 32]
    words = torch.zeros(*lead, v.shape[-2], bits, dtype=torch.int64, device=v.device)
    for i in range(32):
        start = i * bits
        w, off = divmod(start, 32)
        words[..., w] |= (v[..., i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[..., w + 1] |= v[..., i] >> (32 - off)
    out = words.reshape(*lead, -1)[..., : math.ceil(n * bits / 32)]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_bits: int32 words -> unsigned codes (int32), `n` elements along `dim`."""
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    lead, m = p.shape[:-1], p.shape[-1]
    pad = (-m) % bits
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*lead, -1, bits)
    mask = (1 << bits) - 1
    out = torch.empty(*lead, p.shape[-2], 32, dtype=torch.int64, device=p.device)
    for i in range(32):
        w, off = divmod(i * bits, 32)
        val = p[..., w] >> off
        if off + bits > 32:
            val = val | (p[..., w + 1] << (32 - off))
        out[..., i] = val & mask
    out = out.reshape(*lead, -1)[..., :n].to(torch.int32)
    return out.movedim(-1, dim).contiguous()


# AWQ's nibble order (also Quark's `pack_method: reorder`): nibble j (bits 4j..4j+3) of a word
# holds column AWQ_ORDER[j] of its block of 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4_awq_order(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [..., n] (n % 8 == 0) -> int32 words [..., n/8] in AWQ's nibble order."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
    for j, col in enumerate(AWQ_ORDER):
        words |= (v[..., col] & 0xF) << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_awq_order(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_awq_order: int32 [..., m] -> unsigned codes int32 [..., 8m]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty((*w.shape, 8), dtype=torch.int64, device=w.device)
    for j, col in enumerate(AWQ_ORDER):
        out[..., col] = (w >> (4 * j)) & 0xF
    return out.reshape(*w.shape[:-1], -1).to(torch.int32)
