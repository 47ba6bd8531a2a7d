"""CPU backend of the GGUF block ops: `_ggml_blocks.c`, loaded with ctypes.

The C file is built by `pip install` (setup.py, an optional extension: without a compiler the package
installs anyway and the torch reference runs). `QTOOL_GGML_BLOCKS_LIB=/path/lib.so` loads a library
built elsewhere (the tests build one when the package's is missing); `QTOOL_KERNELS=reference`
turns every backend off. ctypes releases the GIL for the call, so rows are split over Python threads
(`QTOOL_GGUF_THREADS`, default the CPUs this process may use).

With an importance matrix (one float per column, llama.cpp's `quant_weights`) the C file runs
llama.cpp's `quantize_row_*_impl` searches for Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K (Q8_0 ignores it,
as llama.cpp does); a non-finite or mis-sized imatrix goes to the reference. Rows holding NaN or inf
are handed back to the reference (the C code reports them).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

ABI_VERSION = 2
# ggml type id -> (block size, bytes per block): the types the C file quantizes, with or without an
# importance matrix (Q8_0 takes one and ignores it)
TYPES = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
         10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
_MIN_ROWS_PER_TASK = 16
_HERE = Path(__file__).resolve().parent


def library_candidates() -> list[Path]:
    """Where the built extension may be: the env override, else qtool/kernels/_ggml_blocks<suffix>."""
    env = os.environ.get("QTOOL_GGML_BLOCKS_LIB")
    if env:
        return [Path(env)]
    return [_HERE / f"_ggml_blocks{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]


@lru_cache(maxsize=None)
def _load(path: str | None = None):
    paths = [Path(path)] if path else library_candidates()
    for p in paths:
        if not p.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(p))
        except OSError:
            continue
        if not hasattr(lib, "qtool_ggml_abi_version") or lib.qtool_ggml_abi_version() != ABI_VERSION:
            continue
        lib.qtool_ggml_quantize.restype = ctypes.c_int64
        lib.qtool_ggml_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_void_p]
        lib.qtool_ggml_quantize_w.restype = ctypes.c_int64
        lib.qtool_ggml_quantize_w.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.qtool_ggml_dequantize.restype = ctypes.c_int
        lib.qtool_ggml_dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        return lib
    return None


def library():
    """The loaded library, or None where it was not built (the reference then runs)."""
    return _load(os.environ.get("QTOOL_GGML_BLOCKS_LIB") or None)


def available() -> bool:
    return library() is not None


def threads() -> int:
    n = int(os.environ.get("QTOOL_GGUF_THREADS", "0") or 0)
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _imatrix_array(imatrix, cols: int) -> np.ndarray | None:
    """The importance matrix as the C code takes it (float32, one per column), or None where the C code
    must not take it: a size other than `cols` (the reference raises its error) or a non-finite value."""
    import torch

    qw = torch.as_tensor(imatrix).detach().to("cpu", torch.float32).reshape(-1)   # as the reference reads it
    if qw.numel() != cols or not bool(torch.isfinite(qw).all()):
        return None
    return np.ascontiguousarray(qw.numpy())


def supports_quantize(x, qtype, imatrix=None) -> bool:
    if not (int(qtype) in TYPES and x.dim() == 2 and x.is_floating_point()
            and x.shape[1] % TYPES[int(qtype)][0] == 0 and x.shape[0] > 0):
        return False
    # Q8_0 ignores an importance matrix (as the reference does); the others need one float per column
    return imatrix is None or int(qtype) == 8 or _imatrix_array(imatrix, x.shape[1]) is not None


def supports_dequantize(data, qtype) -> bool:
    return int(qtype) in TYPES


def _split(n: int, workers: int) -> list[tuple[int, int]]:
    workers = max(1, min(workers, n // _MIN_ROWS_PER_TASK or 1))
    # a few tasks per worker, so one slow thread (a busy core) does not hold the rest up
    tasks = min(n, workers * 4) if workers > 1 else 1
    step = -(-n // tasks)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def quantize(x, qtype, imatrix=None) -> np.ndarray:
    """[rows, cols] float tensor -> uint8 [rows, bytes per row], the same bytes as
    `qtool.formats.gguf.quants.quantize_tensor` (the reference; also run here for rows with NaN/inf)."""
    return quantize_with_error(x, qtype, imatrix, error=False)[0]


def quantize_with_error(x, qtype, imatrix=None, error: bool = True) -> tuple[np.ndarray, tuple[float, float] | None]:
    """`quantize`, plus (sum x^2, sum (x - dequantized)^2) accumulated in float64 while the blocks are
    still in cache (no reconstruction tensor). Rows with NaN/inf make the sums NaN, as torch's would be."""
    import torch

    lib = library()
    t = int(qtype)
    bs, ts = TYPES[t]
    rows, cols = x.shape
    xf = x.detach().to("cpu", torch.float32).contiguous()
    a = xf.numpy()
    qw = None
    if imatrix is not None and t != 8:
        qw = _imatrix_array(imatrix, cols)
        if qw is None:
            raise ValueError(f"_ggml_blocks: the importance matrix must hold {cols} finite values (one per column)")
    out = np.empty((rows, cols // bs * ts), dtype=np.uint8)
    bad: list[int] = []
    sums: list[np.ndarray] = []

    def run(span: tuple[int, int]) -> None:
        r0, r1 = span
        err = np.zeros(2, dtype=np.float64)
        if error:
            sums.append(err)
        while r0 < r1:
            done = lib.qtool_ggml_quantize_w(t, a[r0:r1].ctypes.data, r1 - r0, cols,
                                             None if qw is None else qw.ctypes.data, out[r0:r1].ctypes.data,
                                             err.ctypes.data if error else None)
            if done < 0:
                raise RuntimeError(f"_ggml_blocks: type {t} with {cols} columns refused ({done})")
            if r0 + done >= r1:
                return
            bad.append(r0 + done)   # a non-finite row: the reference takes it
            r0 += done + 1

    spans = _split(rows, threads())
    if len(spans) == 1:
        run(spans[0])
    else:
        with ThreadPoolExecutor(min(len(spans), threads())) as ex:
            list(ex.map(run, spans))
    if bad:
        from qtool.formats.gguf.quants import quantize_tensor

        idx = torch.tensor(sorted(bad))
        out[idx.numpy()] = quantize_tensor(xf[idx], qtype, imatrix)
        if error:
            sums.append(np.array([float("nan"), float("nan")]))
    if not error:
        return out, None
    total = np.sum(sums, axis=0) if sums else np.zeros(2)
    return out, (float(total[0]), float(total[1]))


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """uint8 [..., bytes per row] -> float32 [..., values per row] (gguf-py's `dequantize`, exactly)."""
    lib = library()
    t = int(qtype)
    bs, ts = TYPES[t]
    d = np.ascontiguousarray(data, dtype=np.uint8)
    if d.shape[-1] % ts:
        raise ValueError(f"dequantize: rows of {d.shape[-1]} bytes are not whole blocks of {ts}")
    nblocks = d.size // ts
    out = np.empty((*d.shape[:-1], d.shape[-1] // ts * bs), dtype=np.float32)
    flat_in, flat_out = d.reshape(nblocks, ts), out.reshape(nblocks, bs)

    def run(span: tuple[int, int]) -> None:
        b0, b1 = span
        lib.qtool_ggml_dequantize(t, flat_in[b0:b1].ctypes.data, b1 - b0, flat_out[b0:b1].ctypes.data)

    spans = _split(nblocks, threads()) if nblocks >= 4096 else [(0, nblocks)]
    if len(spans) == 1:
        run(spans[0])
    else:
        with ThreadPoolExecutor(min(len(spans), threads())) as ex:
            list(ex.map(run, spans))
    return out
