"""K-type blocks from a method's own K decomposition (qtool.core.kquant.KScales + codes L):
the bytes llama.cpp's layouts hold, so that gguf-py / llama.cpp decode exactly `KScales.dequantize(L)`.
The byte layouts are those quants.py writes (block_q2_K .. block_q6_K of ggml-common.h)."""

from __future__ import annotations

import numpy as np
import torch

from qtool.core.kquant import QK_K, KScales
from qtool.formats.gguf.quants import _bytes16, _pack_2bit, _pack_bits_le, _pack_k4_scales, _pack_q3_scales, _u8


def _bits(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).view(torch.int16).reshape(-1)


def pack_k(ks: KScales, L: torch.Tensor) -> np.ndarray:
    """(KScales [rows, ...], codes L [rows, cols] in 0..nmax) -> uint8 [rows, cols / 256 * block bytes]."""
    g = ks.grid
    rows, cols = L.shape
    S = rows * (cols // QK_K)
    Li = L.to(torch.int32).reshape(S, QK_K)
    sc = ks.sc.to(torch.int64).reshape(S, g.nsub)
    d = _bytes16(_bits(ks.d)).view(S, 2)
    if g.name in ("Q4_K", "Q5_K"):
        m = ks.m.to(torch.int64).reshape(S, g.nsub)  # type: ignore[union-attr]
        head = torch.cat([d, _bytes16(_bits(ks.dmin)).view(S, 2), _pack_k4_scales(sc, m)], 1)  # type: ignore[arg-type]
        Lh = Li.reshape(S, 4, 2, 32)
        if g.name == "Q4_K":
            out = torch.cat([head, (Lh[:, :, 0] | (Lh[:, :, 1] << 4)).reshape(S, 128).to(torch.uint8)], 1)
        else:
            qs = ((Lh[:, :, 0] & 0xF) | ((Lh[:, :, 1] & 0xF) << 4)).reshape(S, 128).to(torch.uint8)
            shifts = (2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1)).to(torch.int32)
            qh = (((Lh >> 4) & 1) << shifts).sum((1, 2)).to(torch.uint8)
            out = torch.cat([head, qh, qs], 1)
    elif g.name == "Q2_K":
        m = ks.m.to(torch.int64).reshape(S, g.nsub)  # type: ignore[union-attr]
        out = torch.cat([((sc | (m << 4)) & 0xFF).to(torch.uint8), _pack_2bit(Li), d, _bytes16(_bits(ks.dmin)).view(S, 2)], 1)  # type: ignore[arg-type]
    elif g.name == "Q6_K":
        Lq = Li.reshape(S, 2, 4, 32)
        ql = torch.cat([(Lq[:, :, 0] & 0xF) | ((Lq[:, :, 2] & 0xF) << 4),
                        (Lq[:, :, 1] & 0xF) | ((Lq[:, :, 3] & 0xF) << 4)], 2).reshape(S, 128).to(torch.uint8)
        qh = ((Lq[:, :, 0] >> 4) | ((Lq[:, :, 1] >> 4) << 2) | ((Lq[:, :, 2] >> 4) << 4) | ((Lq[:, :, 3] >> 4) << 6))
        out = torch.cat([ql, qh.reshape(S, 64).to(torch.uint8), _u8(sc.float()), d], 1)
    elif g.name == "Q3_K":
        hmask = _pack_bits_le((Li > 3).to(torch.uint8).view(S, 8, 32).transpose(1, 2).reshape(S, QK_K))
        low = torch.where(Li > 3, Li - 4, Li)
        out = torch.cat([hmask, _pack_2bit(low), _pack_q3_scales(sc + 32), d], 1)
    else:
        raise ValueError(g.name)
    return out.numpy().reshape(rows, -1)
