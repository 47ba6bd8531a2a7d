"""Row-split bit packing: HQQ's `W_q` and optimum-quanto's `PackedTensor`.

Both pack unsigned codes [rows, cols] by cutting the rows into `per` equal slices (zero-padded at
the end) and OR-ing slice i into the same words at its own shift, so the packed tensor is
[ceil(rows / per), cols]. They differ only in the order of the shifts:
  HQQ:    slice 0 in the HIGHEST bits (4-bit: first half of the rows in the high nibble;
          3-bit: ten slices in an int32, slice 0 at bit 27, rows padded to a multiple of 10)
  quanto: slice 0 in the LOWEST bits (int4: first half of the rows in the low nibble)
`unpack_rows` is the inverse; `rows` trims the padding.
"""

from __future__ import annotations

import math

import torch


def slices_per_word(bits: int, word_bits: int) -> int:
    return word_bits // bits


def pack_rows(codes: torch.Tensor, bits: int, *, high_first: bool, word: torch.dtype = torch.uint8) -> torch.Tensor:
    """Unsigned codes [rows, ...] (values < 2^bits) -> words [ceil(rows / per), ...] of dtype `word`."""
    word_bits = torch.iinfo(word).bits
    per = slices_per_word(bits, word_bits)
    rows = codes.shape[0]
    step = math.ceil(rows / per)
    wide = torch.int64 if word_bits == 32 else torch.int32
    v = codes.to(wide)
    if step * per != rows:
        v = torch.cat([v, v.new_zeros((step * per - rows, *v.shape[1:]))])
    out = torch.zeros((step, *v.shape[1:]), dtype=wide)
    for i in range(per):
        shift = (per - 1 - i) * bits if high_first else i * bits
        out |= v[i * step : (i + 1) * step] << shift
    if word == torch.int32:
        out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(word)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int, *, high_first: bool) -> torch.Tensor:
    """Words [step, ...] -> unsigned codes int32 [rows, ...]."""
    word_bits = torch.iinfo(packed.dtype).bits
    per = slices_per_word(bits, word_bits)
    p = packed.to(torch.int64) & ((1 << word_bits) - 1)
    mask = (1 << bits) - 1
    parts = [(p >> ((per - 1 - i) * bits if high_first else i * bits)) & mask for i in range(per)]
    return torch.cat(parts)[:rows].to(torch.int32)
