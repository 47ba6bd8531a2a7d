"""GGUF block quantizers in vectorised torch, producing llama.cpp's exact block bytes.

`quantize_tensor(t, qtype, imatrix=None)` turns a 2-D float tensor into the bytes llama.cpp stores for
`qtype` (row-major, one row of blocks per tensor row), so `gguf.quants.dequantize(out, qtype)` works on it.

Exactness. Each algorithm follows llama.cpp's `ggml-quants.c` (`quantize_row_<t>_ref`, which is what
`llama-quantize` runs without an importance matrix, and `quantize_row_<t>_impl` with one) operation for
operation in float32:

* every sum that llama.cpp accumulates in a loop is accumulated here in the same order (`_seqsum`, a
  Python loop over the 16/32 elements of a block, vectorised over all blocks) -- torch's own reductions
  use a different order and would round differently;
* `nearest_int` (the 1.5*2^23 trick) is emulated bit for bit (`_nearest_int`); in the hot candidate
  loops, where its argument provably stays below 2^22, it is `torch.round` (round-half-to-even);
* `scalar / tensor` is written `torch.div(0-dim tensor, tensor)`: `Tensor.__rtruediv__` computes
  `reciprocal()*scalar`, which rounds twice;
* candidate searches keep llama.cpp's sequential acceptance rules (strict `<` / `>`, first win on ties,
  and in `make_qkx2/3_quants` the running `min` that later candidates are measured against);
* `sqrtf` goes through numpy: torch.sqrt on CPU may use MKL's vector math, off by one ulp for some
  inputs (that alone made ~1% of imatrix blocks differ);
* float->int8/uint8 stores wrap modulo 256 like the C assignments do; fp16 stores are torch's
  round-to-nearest-even with NaN canonicalised to 0x7E00 like `GGML_FP32_TO_FP16`, and such a NaN
  decodes as `GGML_FP16_TO_FP32` does (sign | 0x7FC00000, not torch's 0x7FFFFFFF: a NaN scale, which
  overflowing importance weights produce, is requantized through nearest_int's mantissa bits);
* running minima/maxima keep C's first-of-equals (a zero extreme has its first zero's sign, which
  Q4_1/Q5_1 store) and `MAX(max, x)`'s NaN behaviour (`_first_extreme`, `_make_qp_quants`).

C's undefined corners are pinned to what GCC emits on x86-64 (float->int8 casts of inf/NaN or
out-of-range values, `nearest_int` beyond 2^22), so even subnormal or fp16-overflowing inputs match.
Non-finite inputs (NaN/inf weights) give deterministic bytes but are not guaranteed to equal llama.cpp's.
Only fused multiply-adds would break exactness: llama.cpp compiles ggml-quants.c without -march flags
on x86-64 (no FMA), which is what the tests compare against; an aarch64 build of llama.cpp (where GCC
contracts `a*b+c` by default) can differ in rare blocks.

Vectorisation: blocks are laid out element-major (`[block_len, n_blocks]`) so that each step of a
sequential accumulation is one contiguous vector op over all blocks of a chunk; the only Python loops
are over the (small, fixed) number of elements in a block, candidate scales and refinement passes.
Inputs are processed in chunks of blocks so the float32 working set stays around `_WORKSET_BYTES`;
chunks run on `QTOOL_GGUF_THREADS` Python threads (default min(4, cpus); torch ops release the GIL)
with torch's intra-op threading switched off for the duration of the call.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
QK_K = 256

SUPPORTED: set[GGMLQuantizationType] = {
    T.F32, T.F16, T.BF16,
    T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
}
# Types whose llama.cpp quantizer uses an importance matrix (`quant_weights`). Q8_0, F32, F16 and BF16
# accept one and ignore it, as llama.cpp does.
IMATRIX_SUPPORTED: set[GGMLQuantizationType] = {
    T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
}

_WORKSET_BYTES = 64 << 20
# chunks quantized concurrently (Python threads; torch ops release the GIL). QTOOL_GGUF_THREADS=1: serial.
_WORKERS = int(os.environ.get("QTOOL_GGUF_THREADS", "0")) or min(4, os.cpu_count() or 1)
_MIN_CHUNK_BLOCKS = {32: 8192, 256: 256}   # don't split work finer than this (per-op overhead)


def _f32(v: float) -> float:
    """The float32 value nearest `v`, as a Python float (exact constants for float32 ops)."""
    return float(np.float32(v))


GROUP_MAX_EPS = _f32(1e-15)
_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))


# ----------------------------------------------------------------------------------------------------
# small exact helpers


def _rdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t with one rounding (the `a / t` operator would compute reciprocal(t) * a)."""
    return torch.div(torch.tensor(a, dtype=t.dtype), t)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int (add 1.5*2^23, take the mantissa bits), bit for bit -- also for |v| > 2^22,
    inf and NaN, where it is not round() -- as a float tensor of integers."""
    bits = (v + 12582912.0).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).to(v.dtype)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (sqrtf). torch.sqrt on CPU may go through MKL's vector math, which
    is off by one ulp for some inputs; numpy uses the SSE/AVX sqrt instruction."""
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def _seqsum(terms: torch.Tensor, start_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 in index order, as C's `float s = 0; for (i...) s += t[i];` does
    (`start_zero=False`: `float s = t[0]; for (i = 1...) s += t[i];`)."""
    acc = terms[0] + 0.0 if start_zero else terms[0].clone()
    for i in range(1, terms.shape[0]):
        acc.add_(terms[i])
    return acc


def _signed_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): largest |x| along `dim` and the signed value holding it, first one on ties, NaN
    ignored, and (0, +0) for an all-zero block -- llama.cpp's `if (ax > amax) { amax = ax; max = x; }`."""
    if dim == 0:  # element-major blocks: a scan over the few elements beats argmax over a strided dim
        amax = torch.zeros_like(x[0])
        mx = torch.zeros_like(x[0])
        for i in range(x.shape[0]):
            ax = x[i].abs()
            upd = ax > amax
            amax = torch.where(upd, ax, amax)
            mx = torch.where(upd, x[i], mx)
        return amax, mx
    ax = x.abs().nan_to_num_(nan=-1.0, posinf=float("inf"))
    idx = ax.argmax(dim, keepdim=True)
    amax = ax.gather(dim, idx).squeeze(dim).clamp_min_(0.0)
    mx = x.gather(dim, idx).squeeze(dim)
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx


def _first_extreme(x: torch.Tensor, dim: int, largest: bool) -> torch.Tensor:
    """amax/amin along `dim` as C's running `if (v > m) m = v;` / `if (v < m) m = v;` finds it: the first of
    equal extremes. Only a zero extreme can tell them apart (+0 == -0): it keeps the sign of the first zero
    (torch's reductions may return either), which shows in Q4_1/Q5_1's stored fp16 min."""
    m = x.amax(dim) if largest else x.amin(dim)
    first_zero = x.gather(dim, (x == 0).to(torch.uint8).argmax(dim, keepdim=True)).squeeze(dim)
    return torch.where(m == 0, first_zero, m)


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for (...) if (v > m) m = v;` over dim 1 (so +0, never -0, when nothing is > 0)."""
    m = v.amax(1)
    return torch.where(m > 0, m, 0.0)


def _fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML_FP32_TO_FP16: (int16 bit pattern, the float32 value GGML_FP16_TO_FP32 decodes it to)."""
    h = v.half()
    bits = h.view(torch.int16)
    nan = v.isnan()
    if bool(nan.any()):
        neg = v.view(torch.int32) < 0
        bits = torch.where(nan, (neg.to(torch.int16) * -32768) | 0x7E00, bits)
        # ggml decodes sign|0x7E00 to sign|0x7FC00000 (the payload shifted up); torch's half->float gives
        # 0x7FFFFFFF, a NaN whose nearest_int (the mantissa bits) differs when a NaN scale is requantized
        nan_f = torch.where(neg, -4194304, 0x7FC00000).to(torch.int32).view(torch.float32)
        return bits, torch.where(nan, nan_f, h.float())
    return bits, h.float()


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """C's `(int8_t)f` / `(uint8_t)f` as GCC emits it on x86-64 (cvttss2si to int32, keep the low byte;
    NaN and out-of-range give INT32_MIN, i.e. 0): the signed byte value, as float."""
    if bool(v.abs().amax() < 128.0):  # the usual case (NaN compares false): plain truncation
        return v.trunc()
    i = torch.where(v.abs() < 2147483648.0, v, -2147483648.0).to(torch.int64)
    return ((i & 0xFF) ^ 0x80).sub_(0x80).to(v.dtype)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """Integer-valued float tensor -> uint8 with C's modulo-256 store semantics."""
    return torch.remainder(v.to(torch.int64), 256).to(torch.uint8)


def _bytes16(bits: torch.Tensor) -> torch.Tensor:
    """[N] int16 -> [N, 2] uint8 little-endian."""
    return bits.contiguous().view(torch.uint8).view(-1, 2)


def _pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8*k] 0/1 uint8 -> [..., k] uint8, bit j of byte i = bits[8*i + j]."""
    shp = bits.shape
    b = bits.reshape(*shp[:-1], shp[-1] // 8, 8).to(torch.int32)
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)
    return (b * w).sum(-1).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# llama.cpp's scale searches, vectorised over blocks. X is [n, B]: element i of block b at X[i, b].


def _make_qx_quants(X: torch.Tensor, nmax: int, QW: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) -> (scale [B], L [n, B] in 0..2*nmax-1).
    The 19 candidate scales are independent (all relative to the block's max), so their sums are
    accumulated together, element by element ([K, B] vectors); the acceptance scan is sequential."""
    n, B = X.shape
    amax, mx = _signed_absmax(X, 0)
    zero = amax < GROUP_MAX_EPS
    c = [_f32(-nmax)] + [_f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))) for i in range(-9, 10) if i]
    iscales = torch.stack([_rdiv(ci, mx) for ci in c])                     # [K, B]
    W = QW if QW is not None else X * X
    WX = W * X
    sumlx = torch.zeros_like(iscales)
    suml2 = torch.zeros_like(iscales)
    l = torch.empty_like(iscales)
    t = torch.empty_like(iscales)
    # for finite input |iscale * x| <= nmax + 1, where nearest_int is round()
    near = (lambda v: v.round_()) if bool(torch.isfinite(X).all()) else (lambda v: v.copy_(_nearest_int(v)))
    for i in range(n):
        near(torch.mul(iscales, X[i], out=l)).clamp_(-nmax, nmax - 1)
        sumlx.add_(torch.mul(l, WX[i], out=t))
        suml2.add_(torch.mul(l, W[i], out=t).mul_(l))
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], 0.0)
    best = scale * sumlx[0]
    choice = torch.zeros(B, dtype=torch.int64)
    for k in range(1, len(c)):
        slx, sl2 = sumlx[k], suml2[k]
        take = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(take, slx / sl2, scale)
        best = torch.where(take, scale * slx, best)
        choice.masked_fill_(take, k)
    isc = iscales.gather(0, choice[None])[0]
    L = _nearest_int(X * isc).clamp_(-nmax, nmax - 1) + nmax
    scale = torch.where(zero, 0.0, scale)
    L = torch.where(zero, 0.0, L)
    return scale, L


def _make_q3_quants(X: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) -> (scale [B], L [n, B])."""
    n, B = X.shape
    amax, mx = _signed_absmax(X, 0)
    zero = amax < GROUP_MAX_EPS
    iscale = _rdiv(float(-nmax), mx)
    L = _nearest_int(X * iscale).clamp_(-nmax, nmax - 1)
    W = X * X
    WX = W * X
    sumlx = _seqsum(WX * L)
    suml2 = _seqsum(W * L * L)
    for _ in range(5):
        changed_any = False
        for i in range(n):
            w, wx, x, li = W[i], WX[i], X[i], L[i]
            slx = sumlx - wx * li
            sl2 = suml2 - w * li * li
            new_l = _nearest_int(x * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx2 = slx + wx * new_l
            sl22 = sl2 + w * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not bool(take.any()):
                continue
            changed_any = True
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
        if not changed_any:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    scale = torch.where(zero, 0.0, scale)
    L = torch.where(zero, 0.0, L + nmax)
    return scale, L


def _make_qkx_quants(X: torch.Tensor, W: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (identical for non-NULL weights and finite input)
    -> (scale [B], the_min [B] (>= 0, stored as a positive offset), L [n, B] in 0..nmax)."""
    n, B = X.shape
    mn = _first_extreme(X, 0, largest=False)
    mx = _first_extreme(X, 0, largest=True)
    mn_data = mn
    sum_w = _seqsum(W, start_zero=False)
    sum_x = _seqsum(W * X, start_zero=False)
    mn = torch.where(mn > 0, 0.0, mn)
    degenerate = ~(mx > mn)
    iscale = _rdiv(float(nmax), mx - mn)
    scale = _rdiv(1.0, iscale)
    L = _nearest_int(iscale * (X - mn)).clamp_(0, nmax)
    diff = scale * L + mn - X
    best = _seqsum(W * (diff.abs_() if use_mad else diff.square_()))
    L_iscale, L_min = iscale, mn                 # what reproduces the chosen L at the end
    cur_min = mn
    xm = torch.empty_like(X)
    lq = torch.empty_like(X)
    P = torch.empty((n, 3, B), dtype=X.dtype)
    for step in range(nstep + 1):
        c = _f32(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax))
        isc = _rdiv(c, mx - cur_min)
        torch.sub(X, cur_min, out=xm)
        torch.mul(xm, isc, out=lq)
        # nearest_int == round() while |arg| <= 2^22; check that per block with [B]-sized ops
        reach = isc * torch.maximum(mx - cur_min, cur_min - mn_data)
        if bool((reach <= 4.0e6).all()):
            lq.round_()
        else:
            lq.copy_(_nearest_int(lq))
        lq.clamp_(0, nmax)
        torch.mul(W, lq, out=P[:, 0])
        torch.mul(P[:, 0], lq, out=P[:, 1])
        torch.mul(P[:, 0], X, out=P[:, 2])
        s = _seqsum(P)
        sum_l, sum_l2, sum_xl = s[0], s[1], s[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        torch.mul(lq, this_scale, out=xm)
        xm.add_(this_min).sub_(X)
        xm.abs_() if use_mad else xm.square_()
        xm.mul_(W)
        err = _seqsum(xm)
        take = (D > 0) & (err < best)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        L_iscale = torch.where(take, isc, L_iscale)
        L_min = torch.where(take, cur_min, L_min)
        cur_min = torch.where(take, this_min, cur_min)
    L = _nearest_int(L_iscale * (X - L_min)).clamp_(0, nmax)
    L = torch.where(degenerate, 0.0, L)
    scale = torch.where(degenerate, 0.0, scale)
    return scale, -cur_min, L


def _make_qp_quants(X: torch.Tensor, nmax: int, QW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights) -> (scale [B], L [n, B] as stored in uint8 (0..255))."""
    n, B = X.shape
    mx = torch.zeros_like(X[0])
    for i in range(n):   # `max = MAX(max, x[i])`, i.e. max > x ? max : x: a NaN is kept only until the next element
        mx = torch.where(mx > X[i], mx, X[i])
    zero = mx < GROUP_MAX_EPS
    iscale0 = _rdiv(float(nmax), mx)
    c = [_f32(np.float32(0.1) * np.float32(i) + np.float32(nmax)) for i in range(-4, 5) if i]
    iscales = torch.stack([iscale0] + [_rdiv(ci, mx) for ci in c])          # [9, B]
    scales = _rdiv(1.0, iscales)
    l = _nearest_int(X[:, None, :] * iscales[None])                          # [n, 9, B]
    l[:, 1:].clamp_(max=nmax)
    l[:, 0] = torch.remainder(l[:, 0], 256)                                  # stored L, no clamp
    diff = X[:, None, :] - scales[None] * l
    mse = _seqsum(QW[:, None, :] * diff * diff)                              # [9, B]
    ok = mse[1:] < mse[0]
    cand = torch.where(ok, mse[1:], torch.inf)
    k = cand.argmin(0)
    kmin = cand.gather(0, k[None])[0]
    choice = torch.where(kmin < torch.inf, k + 1, 0)
    iscale = iscales.gather(0, choice[None])[0]
    l = _nearest_int(iscale * X).clamp_(max=nmax)                             # int values used in sums
    WX = QW * X
    sumlx = _seqsum(WX * l)
    suml2 = _seqsum(QW * l * l)
    L = torch.remainder(l, 256)                                              # as stored in uint8
    for _ in range(5):
        changed_any = False
        for i in range(n):
            w, wx, x, li = QW[i], WX[i], X[i], L[i]
            slx = sumlx - wx * li
            sl2 = suml2 - w * li * li
            new_l = _nearest_int(x * sl2 / slx).clamp_(max=nmax)
            slx2 = slx + wx * new_l
            sl22 = sl2 + w * new_l * new_l
            take = (slx > 0) & (sl2 > 0) & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not bool(take.any()):
                continue
            changed_any = True
            L[i] = torch.where(take, torch.remainder(new_l, 256), li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
        if not changed_any:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    scale = torch.where(zero, 0.0, scale)
    L = torch.where(zero, 0.0, L)
    return scale, L


# ----------------------------------------------------------------------------------------------------
# legacy 32-element blocks. x is [nb, 32] float32; row_sigma2 [nb] (imatrix variants) is the mean of x^2
# over the block's tensor row; qw [nb, 32].


def _q8_0(x, qw, sigma2):
    amax = x.abs().nan_to_num_(nan=-1.0, posinf=float("inf")).amax(1).clamp_min_(0.0)
    d = amax / 127.0
    idv = torch.where(d != 0, _rdiv(1.0, d), 0.0)
    v = x * idv[:, None]
    # roundf (half away from zero) == trunc(v + copysign(0.49999997f, v)), exactly, for |v| < 2^22
    q = _c_int8(v.add_(torch.where(v < 0, -_HALF_DOWN, _HALF_DOWN)).trunc_())
    bits, _ = _fp16(d)
    return torch.cat([_bytes16(bits), q.to(torch.int8).view(torch.uint8)], 1)


def _pack_nibbles(L: torch.Tensor, mask_low: bool = True) -> torch.Tensor:
    """qs[j] = L[j] | L[j+16] << 4 (Q4_0/Q4_1 store the low value unmasked, Q5_0/Q5_1 mask it)."""
    Li = L.to(torch.int32) & 0xFF
    lo = Li[:, :16] & 0xF if mask_low else Li[:, :16]
    return ((lo | ((Li[:, 16:] & 0xF) << 4)) & 0xFF).to(torch.uint8)


def _qh32(L: torch.Tensor) -> torch.Tensor:
    return _pack_bits_le(((L.to(torch.int32) >> 4) & 1).to(torch.uint8))


def _weights_legacy(x, qw, sigma2):
    return qw * _sqrt(sigma2[:, None] + x * x)


def _q4_0(x, qw, sigma2):
    if qw is None:
        _, mx = _signed_absmax(x, 1)
        d = mx / -8.0
        idv = torch.where(d != 0, _rdiv(1.0, d), 0.0)
        L = _c_int8(x * idv[:, None] + 8.5).clamp_(max=15)  # MIN(15, (int8_t)(x*id + 8.5f))
        bits, _ = _fp16(d)
    else:
        w = _weights_legacy(x, qw, sigma2)
        d, L = _make_qx_quants(x.T.contiguous(), 8, w.T.contiguous())
        L = L.T
        bits, _ = _fp16(d)
    return torch.cat([_bytes16(bits), _pack_nibbles(L, mask_low=False)], 1)


def _q5_0(x, qw, sigma2):
    if qw is None:
        _, mx = _signed_absmax(x, 1)
        d = mx / -16.0
        idv = torch.where(d != 0, _rdiv(1.0, d), 0.0)
        L = _c_int8(x * idv[:, None] + 16.5).clamp_(max=31)
        bits, _ = _fp16(d)
    else:
        w = _weights_legacy(x, qw, sigma2)
        d, L = _make_qx_quants(x.T.contiguous(), 16, w.T.contiguous())
        L = L.T
        bits, _ = _fp16(d)
    return torch.cat([_bytes16(bits), _qh32(L), _pack_nibbles(L)], 1)


def _q4_1_like(x, qw, sigma2, nmax):
    if qw is None:
        mn = _first_extreme(x, 1, largest=False)
        mx = _first_extreme(x, 1, largest=True)
        d = (mx - mn) / float(nmax)
        idv = torch.where(d != 0, _rdiv(1.0, d), 0.0)
        L = _c_int8((x - mn[:, None]) * idv[:, None] + 0.5)
        if nmax == 15:
            L.clamp_(max=15)
        dbits, _ = _fp16(d)
        mbits, _ = _fp16(mn)
    else:
        w = _weights_legacy(x, qw, sigma2)
        d, the_min, L = _make_qkx_quants(x.T.contiguous(), w.T.contiguous(), nmax, -0.9, 0.05, 36, False)
        L = L.T
        dbits, _ = _fp16(d)
        mbits, _ = _fp16(-the_min)
    return L, torch.cat([_bytes16(dbits), _bytes16(mbits)], 1)


def _q4_1(x, qw, sigma2):
    L, head = _q4_1_like(x, qw, sigma2, 15)
    return torch.cat([head, _pack_nibbles(L, mask_low=False)], 1)


def _q5_1(x, qw, sigma2):
    L, head = _q4_1_like(x, qw, sigma2, 31)
    return torch.cat([head, _qh32(L), _pack_nibbles(L)], 1)


# ----------------------------------------------------------------------------------------------------
# K types: x is [S, 256] float32, qw [S, 256] or None.


def _subblocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """[S, 256] -> [n, S*256/n]: element-major sub-blocks (column s*(256/n)+j is sub-block j of s)."""
    return x.reshape(-1, n).T.contiguous()


def _from_subblocks(L: torch.Tensor) -> torch.Tensor:
    return L.T.reshape(-1, QK_K)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[S, 256] values 0..3 -> [S, 64]: qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6."""
    Li = L.to(torch.int32).view(-1, 2, 4, 32)
    q = Li[:, :, 0] | (Li[:, :, 1] << 2) | (Li[:, :, 2] << 4) | (Li[:, :, 3] << 6)
    return q.reshape(-1, 64).to(torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K 12-byte scales from [S, 8] int ls, lm (already as uint8 values), llama.cpp's byte ops."""
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    lo = torch.cat([ls[:, :4], lm[:, :4]], 1)                                  # bytes 0..7 (j<4)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)                           # bytes 8..11
    lo = lo | torch.cat([(ls[:, 4:] >> 4) << 6, (lm[:, 4:] >> 4) << 6], 1)
    return (torch.cat([lo, hi], 1) & 0xFF).to(torch.uint8)


def _k4_scale_values(sc_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7 -> (sc [S, 8], m [S, 8]) as float."""
    q = sc_bytes.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc.float(), m.float()


def _superblock_sigma2(x: torch.Tensor) -> torch.Tensor:
    """sum_x2 over the 256 elements of each super-block, in order -> [S]."""
    xt = x.T.contiguous()
    return _seqsum(xt * xt)


def _q2_K(x, qw, sigma2_unused):
    S = x.shape[0]
    X = _subblocks(x, 16)                                                       # [16, S*16]
    if qw is None:
        scales, mins, L = _make_qkx_quants(X, X.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(S, 16), mins.view(S, 16)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        has_s = max_scale > 0
        ls = _nearest_int(_rdiv(15.0, max_scale)[:, None] * scales).to(torch.int64)
        ls = torch.where(has_s[:, None], ls & 0xFF, 0)
        has_m = max_min > 0
        lm = _nearest_int(_rdiv(15.0, max_min)[:, None] * mins).to(torch.int64)
        sb = torch.where(has_m[:, None], ls | (lm << 4), ls) & 0xFF
        dbits, dval = _fp16(torch.where(has_s, max_scale / 15.0, 0.0))
        mbits, mval = _fp16(torch.where(has_m, max_min / 15.0, 0.0))
    else:
        sumx2 = _superblock_sigma2(x)
        sigma2 = sumx2 / float(QK_K)
        Wt = qw * _sqrt(sigma2[:, None] + x * x)
        Wsub = _subblocks(Wt, 16)
        sw = _seqsum(Wsub).view(S, 16)
        scales, mins, L = _make_qkx_quants(X, Wsub, 3, -0.9, 0.05, 36, False)
        dm, Ls = _make_qp_quants(scales.view(S, 16).T.contiguous(), 15, sw.T.contiguous())
        mm, Lm = _make_qp_quants(mins.view(S, 16).T.contiguous(), 15, sw.T.contiguous())
        dbits, dval = _fp16(dm)
        mbits, mval = _fp16(mm)
        sb = (Ls.T.to(torch.int64) | (Lm.T.to(torch.int64) << 4)) & 0xFF
    d = dval[:, None] * (sb & 0xF).float()
    dmn = mval[:, None] * (sb >> 4).float()
    Lq = _nearest_int((x.view(S, 16, 16) + dmn[:, :, None]) / d[:, :, None]).clamp_(0, 3)
    L = torch.where((d != 0)[:, :, None], Lq, _from_subblocks(L).reshape(S, 16, 16)).reshape(S, QK_K)
    return torch.cat([sb.to(torch.uint8), _pack_2bit(L), _bytes16(dbits).view(S, 2), _bytes16(mbits).view(S, 2)], 1)


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """[S, 16] int values (0..63 after +32) -> 12 bytes, llama.cpp's Q3_K layout."""
    l = l.to(torch.int32)
    low = l & 0xF
    b = low[:, :8] | (low[:, 8:] << 4)                                         # bytes 0..7
    h = (l >> 4) & 3                                                            # [S, 16]
    h = h.view(-1, 4, 4)                                                        # [S, j/4, j%4]
    hb = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)            # bytes 8..11 (index j%4)
    return (torch.cat([b, hb], 1) & 0xFF).to(torch.uint8)


def _q3_scale_values(sc: torch.Tensor) -> torch.Tensor:
    q = sc.to(torch.int32)
    low = torch.cat([q[:, :8] & 0xF, q[:, :8] >> 4], 1)                        # j<8: low nibble, j>=8: high
    j = torch.arange(16)
    hi = (q[:, 8 + (j % 4)] >> (2 * (j // 4))) & 3
    return (low | (hi << 4)).float() - 32.0


def _q3_K(x, qw, sigma2_unused):
    S = x.shape[0]
    X = _subblocks(x, 16)
    if qw is None:
        scales, L = _make_q3_quants(X, 4)
        scales = scales.view(S, 16)
        _, max_scale = _signed_absmax(scales, 1)
        has = max_scale != 0
        iscale = _rdiv(-32.0, max_scale)
        l = _nearest_int(iscale[:, None] * scales)
        l = torch.remainder(l.to(torch.int64) + 128, 256) - 128                 # int8_t l = nearest_int(..)
        l = l.clamp(-32, 31) + 32
        sc = torch.where(has[:, None], _pack_q3_scales(l), torch.zeros((), dtype=torch.uint8))
        dbits, dval = _fp16(torch.where(has, _rdiv(1.0, iscale), 0.0))
    else:
        sumx2 = _superblock_sigma2(x)
        sigma2 = 2.0 * sumx2 / float(QK_K)
        Wt = qw * _sqrt(sigma2[:, None] + x * x)
        Wsub = _subblocks(Wt, 16)
        sw = _seqsum(Wsub).view(S, 16)
        scales, L = _make_qx_quants(X, 4, Wsub)
        d_block, Ls = _make_qx_quants(scales.view(S, 16).T.contiguous(), 32, sw.T.contiguous())
        sc = _pack_q3_scales(Ls.T)
        dbits, dval = _fp16(d_block)
    scv = _q3_scale_values(sc)
    d = dval[:, None] * scv
    Lq = _nearest_int(x.view(S, 16, 16) / d[:, :, None]).clamp_(-4, 3) + 4
    L = torch.where((d != 0)[:, :, None], Lq, _from_subblocks(L).reshape(S, 16, 16)).reshape(S, QK_K).to(torch.int32)
    hbit = (L > 3).to(torch.uint8)                                              # element j -> hmask[j%32] bit j/32
    hmask = _pack_bits_le(hbit.view(S, 8, 32).transpose(1, 2).reshape(S, QK_K))
    L = torch.where(L > 3, L - 4, L)
    return torch.cat([hmask, _pack_2bit(L), sc, _bytes16(dbits).view(S, 2)], 1)


def _q45_K(x, qw, nmax):
    S = x.shape[0]
    X = _subblocks(x, 32)                                                       # [32, S*8]
    if qw is None:
        av_x = _sqrt(_seqsum(X * X) / 32.0)
        W = av_x + X.abs()
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, L = _make_qkx_quants(X, W, nmax, rmin, rdelta, nstep, False)
        scales, mins = scales.view(S, 8), mins.view(S, 8)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), 0.0)
        ls = (_nearest_int(inv_scale[:, None] * scales).to(torch.int64) & 0xFF).clamp_(max=63)
        lm = (_nearest_int(inv_min[:, None] * mins).to(torch.int64) & 0xFF).clamp_(max=63)
        dbits, dval = _fp16(max_scale / 63.0)
        mbits, mval = _fp16(max_min / 63.0)
    else:
        sumx2 = _superblock_sigma2(x)
        sigma2 = 2.0 * sumx2 / float(QK_K)
        Wt = qw * _sqrt(sigma2[:, None] + x * x)
        W = _subblocks(Wt, 32)
        sw = _seqsum(W).view(S, 8)
        scales, mins, L = _make_qkx_quants(X, W, nmax, -0.9, 0.05, 36, False)
        d_block, Ls = _make_qp_quants(scales.view(S, 8).T.contiguous(), 63, sw.T.contiguous())
        m_block, Lm = _make_qp_quants(mins.view(S, 8).T.contiguous(), 63, sw.T.contiguous())
        ls, lm = Ls.T.to(torch.int64), Lm.T.to(torch.int64)
        if nmax == 31:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        dbits, dval = _fp16(d_block)
        mbits, mval = _fp16(m_block)
    sc_bytes = _pack_k4_scales(ls, lm)
    sc, m = _k4_scale_values(sc_bytes)
    d = dval[:, None] * sc
    dm = mval[:, None] * m
    Lq = _nearest_int((x.view(S, 8, 32) + dm[:, :, None]) / d[:, :, None]).clamp_(0, nmax)
    L = torch.where((d != 0)[:, :, None], Lq, _from_subblocks(L).reshape(S, 8, 32)).to(torch.int32)
    L = L.reshape(S, 4, 2, 32)                                                     # 64-element chunks, halves
    head = torch.cat([_bytes16(dbits).view(S, 2), _bytes16(mbits).view(S, 2), sc_bytes], 1)
    if nmax == 15:
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(S, 128).to(torch.uint8)
        return torch.cat([head, qs], 1)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(S, 128).to(torch.uint8)
    hb = (L >> 4) & 1                                                           # [S, 4, 2, 32]
    shifts = (2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1)).to(torch.int32)
    qh = (hb << shifts).sum((1, 2)).to(torch.uint8)                             # [S, 32]
    return torch.cat([head, qh, qs], 1)


def _q4_K(x, qw, sigma2_unused):
    return _q45_K(x, qw, 15)


def _q5_K(x, qw, sigma2_unused):
    return _q45_K(x, qw, 31)


def _q6_K(x, qw, sigma2_unused):
    S = x.shape[0]
    X = _subblocks(x, 16)
    scales, L = _make_qx_quants(X, 32, None if qw is None else _subblocks(qw, 16))
    scales = scales.view(S, 16)
    amax, max_scale = _signed_absmax(scales, 1)
    zero = amax < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, max_scale)
    dbits, dval = _fp16(_rdiv(1.0, iscale))
    dbits = torch.where(zero, 0, dbits)
    dval = torch.where(zero, 0.0, dval)
    isc = _nearest_int(iscale[:, None] * scales).clamp_(max=127)
    isc = torch.where(zero[:, None], 0.0, isc)
    d = dval[:, None] * isc
    Lq = _nearest_int(x.view(S, 16, 16) / d[:, :, None]).clamp_(-32, 31) + 32
    L = torch.where((d != 0)[:, :, None], Lq, _from_subblocks(L).reshape(S, 16, 16))
    L = torch.where(zero[:, None, None], 0.0, L).to(torch.int32).reshape(S, 2, 4, 32)  # 128-halves, quarters
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                    (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], 2).reshape(S, 128).to(torch.uint8)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    qh = qh.reshape(S, 64).to(torch.uint8)
    return torch.cat([ql, qh, _u8(isc), _bytes16(dbits).view(S, 2)], 1)


# ----------------------------------------------------------------------------------------------------
# driver

# qtype -> (kernel, approximate bytes of working set per input element)
_KERNELS = {
    T.Q8_0: (_q8_0, 24),
    T.Q4_0: (_q4_0, 24),
    T.Q4_1: (_q4_1, 24),
    T.Q5_0: (_q5_0, 24),
    T.Q5_1: (_q5_1, 24),
    T.Q2_K: (_q2_K, 64),
    T.Q3_K: (_q3_K, 48),
    T.Q4_K: (_q4_K, 64),
    T.Q5_K: (_q5_K, 64),
    T.Q6_K: (_q6_K, 64),
}
_LEGACY_ROW_SIGMA = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


@contextlib.contextmanager
def _single_threaded_torch():
    """Intra-op threads off for the duration: the work is many mid-sized ops, where OpenMP fork/join
    (and spinning on a busy machine) costs more than it gains; parallelism comes from chunk workers."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fp32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even; NaN -> quiet NaN keeping sign and top payload."""
    u = x.contiguous().view(torch.int32)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = torch.where(nan, (u >> 16) | 64, r)
    return (r & 0xFFFF).to(torch.int16)   # wraps modulo 2^16


def _row_sigma2(t: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """llama.cpp's per-row `sum_x2 / n_per_row` (sum accumulated in column order) -> [rows]."""
    rows, cols = t.shape
    out = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, rows_per_chunk):
        xt = t[r0:r0 + rows_per_chunk].float().T.contiguous()
        out[r0:r0 + rows_per_chunk] = _seqsum(xt * xt) / float(cols)
    return out


def quantize_tensor(t: torch.Tensor, qtype: GGMLQuantizationType, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """Quantize a 2-D float tensor [rows, cols] to GGUF `qtype`; returns uint8 [rows, cols/block*type_size]
    holding exactly the bytes llama.cpp writes (`llama-quantize` without / with an importance matrix).

    `imatrix`: optional per-column importance weights, shape [cols] (what llama.cpp's imatrix file holds
    for this tensor, i.e. mean squared activations of the column). Used by the types in
    IMATRIX_SUPPORTED; ignored (as in llama.cpp) by Q8_0, F32, F16 and BF16.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"quantize_tensor: unsupported GGML type {qtype.name}")
    if t.ndim != 2:
        raise ValueError(f"quantize_tensor: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"quantize_tensor: expected a float tensor, got {t.dtype}")
    rows, cols = t.shape
    bs, ts = GGML_QUANT_SIZES[qtype]
    if cols % bs:
        raise ValueError(f"{qtype.name}: row length {cols} is not a multiple of the block size {bs}")
    t = t.detach().cpu()

    if qtype == T.F32:
        return t.float().numpy().astype(np.float32, copy=True).view(np.uint8).reshape(rows, cols * 4)
    if qtype in (T.F16, T.BF16):
        out = np.empty((rows, cols * 2), dtype=np.uint8)
        step = max(1, (_WORKSET_BYTES // 16) // max(cols, 1))
        for r0 in range(0, rows, step):
            x = t[r0:r0 + step]
            if qtype == T.F16:
                bits = _fp16(x.float())[0]
            elif x.dtype == torch.bfloat16:   # already bf16: keep the bits, only quiet NaNs like ggml
                bits = x.contiguous().view(torch.int16)
                bits = torch.where((bits & 0x7FFF) > 0x7F80, bits | 64, bits)
            else:
                bits = _fp32_to_bf16_bits(x.float())
            out[r0:r0 + step] = bits.numpy().view(np.uint8).reshape(-1, cols * 2)
        return out

    qw = None
    if imatrix is not None and qtype in IMATRIX_SUPPORTED:
        qw = torch.as_tensor(imatrix).detach().cpu().float().reshape(-1)
        if qw.numel() != cols:
            raise ValueError(f"{qtype.name}: imatrix has {qw.numel()} entries, expected one per column ({cols})")

    kernel, per_elem = _KERNELS[qtype]
    if qw is not None:
        per_elem = max(per_elem, 64)
    nbpr = cols // bs                       # blocks per row
    nblocks = rows * nbpr
    workers = max(1, min(_WORKERS, nblocks // _MIN_CHUNK_BLOCKS.get(bs, 1)))
    per_chunk = max(1, _WORKSET_BYTES // workers // (per_elem * bs))      # blocks per chunk
    per_chunk = min(per_chunk, -(-nblocks // workers))                    # give every worker a share
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    out = np.empty((nblocks, ts), dtype=np.uint8)
    with _single_threaded_torch(), torch.inference_mode():
        sig = None
        if qw is not None and qtype in _LEGACY_ROW_SIGMA:
            sig = _row_sigma2(t, max(1, (_WORKSET_BYTES // 8) // cols))
        qw_blocks = qw.view(nbpr, bs) if qw is not None else None

        def work(b0: int) -> None:
            b1 = min(nblocks, b0 + per_chunk)
            with torch.inference_mode():
                x = flat[b0 * bs:b1 * bs].float().view(b1 - b0, bs)
                qwc = sig_c = None
                if qw_blocks is not None:
                    bidx = torch.arange(b0, b1)
                    qwc = qw_blocks[bidx % nbpr]
                    if sig is not None:
                        sig_c = sig[bidx // nbpr]
                out[b0:b1] = kernel(x, qwc, sig_c).numpy()

        starts = range(0, nblocks, per_chunk)
        if workers == 1 or len(starts) == 1:
            for b0 in starts:
                work(b0)
        else:  # torch releases the GIL inside ops: chunks overlap on separate cores
            with ThreadPoolExecutor(workers) as ex:
                for _ in ex.map(work, starts):
                    pass
    return out.reshape(rows, nbpr * ts)
