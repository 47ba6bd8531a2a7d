"""CUDA backend (Triton) for the int4 ops, on the `Int4Weight` layout as stored (no re-packing).

* `dequantize`: one program per [BLOCK_N, BLOCK_KW*8] tile; the same float32 math as the
  reference ((q - z) * s, then the cast), so it is bit-identical to it.
* `linear`, few rows (decode, batch 1): a GEMV that streams each row's packed words once,
  coalesced along the row, unpacks eight nibbles per word in registers and reduces in float32;
  memory-bound by design (tests/bench: W4 g128 at batch 1 against the bandwidth bound).
* `linear`, many rows (evaluation windows): a tiled `tl.dot` GEMM that dequantizes each weight
  tile in registers to the activation dtype (the reference's rounding) and accumulates in float32.

Each dequantized weight element equals the reference's; only the summation order differs, so the
tests compare `linear` within a stated tolerance and `dequantize` exactly.
"""

from __future__ import annotations

import torch

from qtool.kernels.int4 import Int4Weight

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the backend reports itself unavailable
    triton = None

GEMV_MAX_ROWS = 8
GEMV_BLOCK_N, GEMV_BLOCK_KW = 16, 64
GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_BLOCK_K = 64, 64, 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports_weight(w: Int4Weight, *_: object, **__: object) -> bool:
    return w.packed.is_cuda and w.group_size % 8 == 0 and w.in_features % 8 == 0


def supports(x: torch.Tensor, w: Int4Weight, *_: object, **__: object) -> bool:
    return x.is_cuda and x.dtype in DTYPES and x.shape[-1] == w.in_features and supports_weight(w)


if triton is not None:

    @triton.jit
    def _row_tile(w_ptr, s_ptr, z_ptr, rn, kw, N, KW, NG, G, HAS_ZERO: tl.constexpr):
        """Rows rn x words kw, dequantized in float32: [len(rn), len(kw), 8] (and the tile's mask)."""
        mask = (rn[:, None] < N) & (kw[None, :] < KW)
        words = tl.load(w_ptr + rn[:, None] * KW + kw[None, :], mask=mask, other=0)
        shifts = tl.arange(0, 8) * 4
        q = (((words[:, :, None] >> shifts[None, None, :]) & 0xF) - 8).to(tl.float32)
        grp = (kw * 8) // G  # a group holds whole words (group sizes are multiples of 8)
        s = tl.load(s_ptr + rn[:, None] * NG + grp[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[:, None] * NG + grp[None, :], mask=mask, other=0).to(tl.float32)
            q = q - z[:, :, None]
        return q * s[:, :, None], mask

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, KW, NG, G,
                        HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kw = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
        w, mask = _row_tile(w_ptr, s_ptr, z_ptr, rn, kw, N, KW, NG, G, HAS_ZERO)
        wdq = w.to(out_ptr.dtype.element_ty)
        k = kw[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(out_ptr + rn[:, None, None] * (KW * 8) + k[None, :, :], wdq, mask=mask[:, :, None])

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, KW, NG, G, stride_xm, stride_ym,
                     HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + tl.arange(0, BLOCK_KW)
            w, mask = _row_tile(w_ptr, s_ptr, z_ptr, rn, kw, N, KW, NG, G, HAS_ZERO)
            wdq = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's rounding of W
            k = kw[:, None] * 8 + tl.arange(0, 8)[None, :]
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < KW * 8, other=0.0).to(tl.float32)
            acc += tl.sum(tl.sum(wdq * x[None, :, :], axis=2), axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NG, G, stride_xm, stride_ym,
                     HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        KW = K // 8
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            wmask = (k[:, None] < K) & (rn[None, :] < N)
            words = tl.load(w_ptr + rn[None, :] * KW + k[:, None] // 8, mask=wmask, other=0)  # [BLOCK_K, BLOCK_N]
            q = (((words >> ((k[:, None] % 8) * 4)) & 0xF) - 8).to(tl.float32)
            grp = k[:, None] // G
            s = tl.load(s_ptr + rn[None, :] * NG + grp, mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                q = q - tl.load(z_ptr + rn[None, :] * NG + grp, mask=wmask, other=0).to(tl.float32)
            wdq = (q * s).to(x_ptr.dtype.element_ty)
            if IEEE:
                acc += tl.dot(x, wdq, input_precision="ieee")
            else:
                acc += tl.dot(x, wdq)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def dequantize(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, kw = w.out_features, w.in_features // 8
    out = torch.empty(n, w.in_features, dtype=dtype, device=w.device)
    zero = w.zero if w.zero is not None else w.scale  # any pointer; unused without HAS_ZERO
    grid = (triton.cdiv(n, GEMV_BLOCK_N), triton.cdiv(kw, GEMV_BLOCK_KW))
    _dequant_kernel[grid](w.packed, w.scale, zero, out, n, kw, w.scale.shape[1], w.group_size,
                          HAS_ZERO=w.zero is not None, BLOCK_N=GEMV_BLOCK_N, BLOCK_KW=GEMV_BLOCK_KW)
    return out


def linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, *,
           block_n: int | None = None, block_kw: int | None = None) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], w.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    zero = w.zero if w.zero is not None else w.scale
    b = bias.to(x.dtype).contiguous() if bias is not None else y
    flags = dict(HAS_ZERO=w.zero is not None, HAS_BIAS=bias is not None)
    if m <= GEMV_MAX_ROWS:
        bn, bkw = block_n or GEMV_BLOCK_N, block_kw or GEMV_BLOCK_KW
        _gemv_kernel[(triton.cdiv(n, bn), m)](x2, w.packed, w.scale, zero, b, y, n, k // 8, w.scale.shape[1],
                                               w.group_size, x2.stride(0), y.stride(0), **flags,
                                               BLOCK_N=bn, BLOCK_KW=bkw)
    else:
        grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
        _gemm_kernel[grid](x2, w.packed, w.scale, zero, b, y, m, n, k, w.scale.shape[1], w.group_size,
                           x2.stride(0), y.stride(0), **flags, IEEE=x.dtype == torch.float32,
                           BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N, BLOCK_K=GEMM_BLOCK_K)
    return y.reshape(*lead, n)
