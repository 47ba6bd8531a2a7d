"""llama.cpp's own quantizers as a test oracle.

Builds `ggml/src/ggml-quants.c` from the llama.cpp copy vendored in the `llama_cpp_python` sdist into a
small shared library (cached under `$QTOOL_CACHE/ggml_ref/`) and calls it through ctypes. Only that one
translation unit is compiled, plus a few stubs for the ggml symbols it references
(`ggml_abort`, `ggml_row_size`, ...), so the build takes a few seconds and needs nothing but gcc/cc.

Compiler flags: `-O3 -DNDEBUG` like llama.cpp's Release build of ggml-base, and `-ffp-contract=off`.
On x86-64 upstream compiles ggml-quants.c without `-march` flags (those only go to ggml-cpu), so it has no
FMA instructions anyway; the flag just keeps the oracle identical on machines (aarch64) where GCC would
otherwise fuse `a*b + c` into FMAs and round differently.

The sdist is looked up in `$QTOOL_LLAMA_CPP_SDIST`, `$QTOOL_CACHE/llama.cpp/` (where `make llama-cpp`,
tests/llama_cpp_tools.py, keeps it), `$QTOOL_CACHE/`, `/tmp/lcp/`, and otherwise downloaded the same way as
llama_cpp_tools does, `pip download` through the package index pip is configured with (the one registry a
CI machine reaches; pypi.org's JSON API may not be).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from llama_cpp_tools import LLAMA_CPP_PYTHON_VERSION as SDIST_VERSION  # one llama.cpp version for both oracles
from llama_cpp_tools import SDIST_NAME, _ensure_sdist

_VENDOR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/ggml/"
_NEEDED = (
    "src/ggml-quants.c",
    "src/ggml-quants.h",
    "src/ggml-common.h",
    "src/ggml-impl.h",
    "src/ggml-cpu/ggml-cpu-impl.h",
)
CFLAGS = ["-O3", "-DNDEBUG", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off"]

# ggml type id -> (C type name in the symbol, block size, bytes per block)
TYPES = {
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    10: ("q2_K", 256, 84),
    11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210),
}

_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include "ggml.h"
#include "ggml-impl.h"
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args; va_start(args, fmt);
    fprintf(stderr, "%s:%d: ", file, line); vfprintf(stderr, fmt, args); fprintf(stderr, "\n");
    va_end(args); abort();
}
static int64_t blck(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_0: return QK4_0;  case GGML_TYPE_Q4_1: return QK4_1;
        case GGML_TYPE_Q5_0: return QK5_0;  case GGML_TYPE_Q5_1: return QK5_1;
        case GGML_TYPE_Q8_0: return QK8_0;
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K: return QK_K;
        default: return 1;
    }
}
size_t ggml_type_size(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_0: return sizeof(block_q4_0); case GGML_TYPE_Q4_1: return sizeof(block_q4_1);
        case GGML_TYPE_Q5_0: return sizeof(block_q5_0); case GGML_TYPE_Q5_1: return sizeof(block_q5_1);
        case GGML_TYPE_Q8_0: return sizeof(block_q8_0);
        case GGML_TYPE_Q2_K: return sizeof(block_q2_K); case GGML_TYPE_Q3_K: return sizeof(block_q3_K);
        case GGML_TYPE_Q4_K: return sizeof(block_q4_K); case GGML_TYPE_Q5_K: return sizeof(block_q5_K);
        case GGML_TYPE_Q6_K: return sizeof(block_q6_K);
        default: fprintf(stderr, "ggml_ref stub: type %d unsupported\n", (int)t); abort();
    }
}
size_t ggml_row_size(enum ggml_type t, int64_t ne) { return ggml_type_size(t) * ne / blck(t); }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }

/* llama.cpp's scalar fp32 -> fp16 / bf16 conversions (ggml_fp32_to_fp16_row, ggml_fp32_to_bf16_row_ref) */
void ref_fp32_to_fp16(const float * x, uint16_t * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = GGML_FP32_TO_FP16(x[i]);
}
void ref_fp32_to_bf16(const float * x, uint16_t * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = GGML_FP32_TO_BF16(x[i]).bits;
}
"""


def _cache_dir() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("QTOOL_CACHE", root / ".cache"))


def find_sdist(download: bool = True) -> Path:
    cache = _cache_dir()
    cands = [os.environ.get("QTOOL_LLAMA_CPP_SDIST"), cache / "llama.cpp" / SDIST_NAME, cache / SDIST_NAME,
             Path("/tmp/lcp") / SDIST_NAME]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    if not download:
        raise FileNotFoundError(SDIST_NAME)
    return _ensure_sdist(cache)


def build(cache: Path | None = None) -> Path:
    """Compile (once) and return the path of the shared library. Safe against concurrent builds: every
    artefact is written under a process-unique name and renamed into place."""
    out_dir = (cache or _cache_dir()) / "ggml_ref"
    src_dir = out_dir / f"ggml-{SDIST_VERSION}"
    key = hashlib.sha256((" ".join(CFLAGS) + _STUBS + SDIST_VERSION).encode()).hexdigest()[:12]
    lib = out_dir / f"libggml_quants_ref-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.tmp"
    if not (src_dir / "src" / "ggml-quants.c").is_file():
        tmp_src = out_dir / f"ggml.{tag}"
        with tarfile.open(find_sdist()) as tf:
            for m in tf.getmembers():
                rel = m.name[len(_VENDOR):] if m.name.startswith(_VENDOR) else None
                if rel is None or not m.isfile():
                    continue
                if rel in _NEEDED or (rel.startswith("include/") and rel.endswith(".h")):
                    dest = tmp_src / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(m).read())
        try:
            tmp_src.rename(src_dir)
        except OSError:  # another process won the race
            shutil.rmtree(tmp_src, ignore_errors=True)
    stubs = out_dir / f"stubs-{key}.{tag}.c"
    stubs.write_text(_STUBS)
    cc = os.environ.get("CC", "gcc" if shutil.which("gcc") else "cc")
    tmp = out_dir / f"{lib.name}.{tag}"
    try:
        subprocess.run(
            [cc, *CFLAGS, f"-I{src_dir / 'include'}", f"-I{src_dir / 'src'}", "-o", str(tmp),
             str(src_dir / "src" / "ggml-quants.c"), str(stubs), "-lm"],
            check=True, capture_output=True, text=True,
        )
        os.replace(tmp, lib)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building ggml-quants.c failed:\n{e.stderr}") from e
    finally:
        stubs.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return lib


class GGMLRef:
    """ctypes front for llama.cpp's `quantize_<type>(src, dst, nrow, n_per_row, imatrix)` -- the function
    `llama-quantize` reaches through `ggml_quantize_chunk` (with `imatrix=NULL` it runs the `_ref` path)."""

    def __init__(self, lib: Path | None = None):
        self.lib = ctypes.CDLL(str(lib or build()))
        for name, _, _ in TYPES.values():
            f = getattr(self.lib, f"quantize_{name}")
            f.restype = ctypes.c_size_t
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        for name in ("ref_fp32_to_fp16", "ref_fp32_to_bf16"):
            f = getattr(self.lib, name)
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def quantize(self, x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        name, bs, ts = TYPES[int(qtype)]
        out = np.zeros((rows, cols // bs * ts), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert qw.shape == (cols,)
        n = getattr(self.lib, f"quantize_{name}")(
            x.ctypes.data, out.ctypes.data, rows, cols, None if qw is None else qw.ctypes.data
        )
        assert n == out.nbytes
        return out

    def fp32_to_fp16(self, x: np.ndarray) -> np.ndarray:
        return self._conv("ref_fp32_to_fp16", x)

    def fp32_to_bf16(self, x: np.ndarray) -> np.ndarray:
        return self._conv("ref_fp32_to_bf16", x)

    def _conv(self, fn: str, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape, dtype=np.uint16)
        getattr(self.lib, fn)(x.ctypes.data, out.ctypes.data, x.size)
        return out
