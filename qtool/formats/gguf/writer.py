"""GGUF, the single-file format llama.cpp (and ollama, LM Studio...) loads.

`qtool quantize MODEL -f gguf --type Q4_K_M -o model.gguf` / `qtool export DIR -f gguf --type F16`.

What one run does, in llama.cpp's own terms: the equivalent of `convert_hf_to_gguf.py` (names,
Q/K row permutation, stacked experts, hyper-parameters, tokenizer) followed by `llama-quantize`
(the mixture's per-tensor types, see mixtures.py), in one pass and without the 16-bit
intermediate file.

With a calibration method (`-m gptq --dataset ...`) the writer still picks every tensor's type;
`calibration_specs()` then tells the pipeline which decoder-block linears the method quantizes
and on which grid (GPTQ_GRIDS), and `add_quantized()` stores the result: bit for bit in the
32-wide legacy types, re-quantized (loss reported per tensor) in the K types. Everything else
(token_embd, output, norms) is quantized here as without a method.

Streaming: a GGUF file lists every tensor (name, shape, type, offset) before any data, so
`begin()` plans the whole file from shapes alone (`source.tensors()` + config), writes header,
metadata and tensor infos, and each tensor's bytes go to the file as it arrives. Tensors are
declared in the order they complete under the pipeline's block-by-block order, so nothing waits
in memory; a stacked expert tensor holds its experts' quantized bytes until its last expert
arrives (one block at most). The provenance record (known only at the end) goes into a
fixed-size `qtool.provenance` string reserved as the last metadata value and filled in by
`finish()`.

The `--type` default: with `qtool export` (no recipe) the converter's `auto` (BF16 for a bf16
checkpoint, F16 otherwise); with `qtool quantize` the mixture matching `--bits`: 8 -> Q8_0,
4 -> Q4_K_M (llama.cpp's usual recommendation), 3 -> Q3_K_M, 2 -> Q2_K.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.gguf_writer import GGUFValue

from qtool import __version__, kernels
from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, TensorOutcome
from qtool.formats.gguf import imatrix as imx
from qtool.formats.gguf import metadata as md
from qtool.formats.gguf import mixtures as mx
from qtool.formats.gguf import quants
from qtool.formats.gguf.kpack import pack_k
from qtool.formats.gguf import tokenizer as tk
from qtool.formats.gguf.plan import Entry, _arrival_order, _Planner, auto_type, permute_qk_rows  # noqa: F401
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.model.source import CheckpointSource, TensorMeta, block_of
from qtool.qtypes import QType

T = gguf.GGMLQuantizationType
PROVENANCE_KEY = "qtool.provenance"
PROVENANCE_BYTES = 64 * 1024  # reserved for the JSON record, padded with spaces
BITS_TO_MIXTURE = {"int8": "Q8_0", "int4": "Q4_K_M", "int3": "Q3_K_M", "int2": "Q2_K"}
DTYPE_TO_TYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# -- encoding one tensor ---------------------------------------------------------------------------


# Rows are encoded in chunks of about this many elements, so that the float32 copy, the block
# bytes and their reconstruction (for the error figure) never exist for a whole large tensor at
# once: a 49152 x 2048 embedding would otherwise need ~1.2 GB of temporaries.
CHUNK_ELEMENTS = 1 << 22
_TORCH_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def _quantize_rows(rows: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> np.ndarray:
    """[rows, cols] float32 -> uint8 [rows, bytes_per_row], llama.cpp's block bytes (the kernels'
    `gguf_quantize`: the C backend where built and applicable, else quants.quantize_tensor)."""
    if qtype in quants.SUPPORTED:
        return np.ascontiguousarray(kernels.call("gguf_quantize", rows, qtype, importance))
    raise UnsupportedError(f"--format gguf: no quantizer for {qtype.name} is available")


def _encode_chunk(xf: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """float32 rows -> (bytes for the file, their reconstruction in float32)."""
    if qtype in _TORCH_FLOATS:  # float casts round to nearest even, as ggml's converters do
        h = xf.to(_TORCH_FLOATS[qtype])
        return (h if qtype == T.F32 else h.view(torch.int16)).numpy(), h.float()
    data = _quantize_rows(xf, qtype, importance)
    return data, torch.from_numpy(kernels.call("gguf_dequantize", data, qtype)).reshape(xf.shape)


def encode(x: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Tensor -> (the array written to the file, (|x|^2, |x - reconstruction|^2), or None when the
    bytes hold `x` exactly). Works through the rows in chunks (see CHUNK_ELEMENTS). `importance`:
    an imatrix's column weights [n_mat, cols], one row per matrix of `x` (experts of a 3-D tensor)."""
    x = x.detach().to("cpu").contiguous()
    if importance is not None and x.dim() == 3:  # per expert, each with its own row of weights
        done = [encode(x[i], qtype, importance[i:i + 1]) for i in range(x.shape[0])]
        errs = [err for _, err in done if err is not None]
        total = (sum(e[0] for e in errs), sum(e[1] for e in errs)) if errs else None
        return np.stack([data for data, _ in done]), total
    importance = None if importance is None else importance.reshape(-1)
    if qtype in _TORCH_FLOATS and x.dtype == _TORCH_FLOATS[qtype]:
        return (x if qtype == T.F32 else x.view(torch.int16)).numpy(), None
    exact = qtype == T.F32 and x.dtype in (torch.float16, torch.bfloat16)
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    parts, signal, noise = [], 0.0, 0.0
    # the quantizers' float32 rows go through one buffer: a fresh 16 MB block per chunk costs more in
    # page faults than the conversion itself (their outputs are new arrays; float outputs may be views)
    buf = None if qtype in _TORCH_FLOATS or rows.dtype == torch.float32 else torch.empty(
        (min(step, rows.shape[0]), rows.shape[1]), dtype=torch.float32)
    for i in range(0, rows.shape[0], step):
        if buf is None:
            xf = rows[i : i + step].float()
        else:
            xf = buf[: min(step, rows.shape[0] - i)]
            xf.copy_(rows[i : i + step])
        if qtype in _TORCH_FLOATS:
            data, recon = _encode_chunk(xf, qtype, importance)
            err = None if exact else (torch.linalg.vector_norm(xf).item() ** 2,
                                      torch.linalg.vector_norm(xf - recon).item() ** 2)
        elif qtype in quants.SUPPORTED:  # the C kernel where built (errors summed in float64), else torch
            data, err = kernels.call("gguf_quantize_error", xf, qtype, importance)
        else:
            raise UnsupportedError(f"--format gguf: no quantizer for {qtype.name} is available")
        parts.append(np.ascontiguousarray(data))
        if err is not None:
            signal += err[0]
            noise += err[1]
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return data.reshape(*x.shape[:-1], -1), None if exact else (signal, noise)


# -- GPTQ codes in GGUF blocks ---------------------------------------------------------------------
#
# A calibration method (GPTQ) quantizes each decoder-block linear on the grid of the GGUF type the
# mixture gives its tensor. The 32-wide legacy types store exactly what GPTQ produces on an int
# grid with groups of 32 and fp16 scales (ggml-quants.c `dequantize_row_*`, L the stored code):
#   Q8_0  x = L*d,            L = q         (int8 symmetric)
#   Q4_0  x = (L - 8)*d,      L = q + 8     (int4 symmetric)
#   Q5_0  x = (L - 16)*d,     L = q + 16    (int5 symmetric)
#   Q4_1  x = L*d + m,        L = q + 8,  d = s, m = -(z + 8)*s   (int4 asymmetric)
#   Q5_1  x = L*d + m,        L = q + 16, d = s, m = -(z + 16)*s  (int5 asymmetric)
# so codes and scales are kept bit for bit; only Q4_1/Q5_1's offset m = -(z - qmin)*s is rounded
# to fp16 (measured and reported per tensor). The K types (super-blocks of 256 whose sub-block
# scales are themselves quantized) hold no GPTQ grid: GPTQ runs on the nearest one (same bits,
# same sub-block width, same symmetry) and its dequantized weights are re-quantized with the
# tensor's type, the loss reported per tensor as the SQNR of the stored weights vs GPTQ's.


def _int_qtype(bits: int, signed_scale: bool = False) -> QType:
    """The GGUF grids' int types: not `--qtype` values (int5/int6 exist only here), and symmetric
    ones scale as llama.cpp does (QType.signed_scale: the group's peak lands on qmin, a step of
    max|w|/8 instead of compressed-tensors' max|w|/7.5 for int4)."""
    return QType(f"int{bits}", "int", bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8, signed_scale)


@dataclass(frozen=True)
class Grid:
    """The GPTQ grid for one GGUF type: `reusable` when the type stores its codes as they are."""

    qtype: QType
    group_size: int
    symmetric: bool
    reusable: bool


GPTQ_GRIDS: dict[T, Grid] = {
    T.Q8_0: Grid(_int_qtype(8, True), 32, True, True),
    T.Q4_0: Grid(_int_qtype(4, True), 32, True, True),
    T.Q4_1: Grid(_int_qtype(4), 32, False, True),
    T.Q5_0: Grid(_int_qtype(5, True), 32, True, True),
    T.Q5_1: Grid(_int_qtype(5), 32, False, True),
    # nearest grids of the K types (ggml-quants.c quantize_row_*_K_ref: sub-block width, symmetry)
    T.Q2_K: Grid(_int_qtype(2), 16, False, False),  # x = d*sc*L - dmin*m, 16-wide
    T.Q3_K: Grid(_int_qtype(3, True), 16, True, False),  # x = d*sc*(L - 4), 16-wide
    T.Q4_K: Grid(_int_qtype(4), 32, False, False),  # x = d*sc*L - dmin*m, 32-wide
    T.Q5_K: Grid(_int_qtype(5), 32, False, False),
    T.Q6_K: Grid(_int_qtype(6, True), 16, True, False),  # x = d*sc*(L - 32), 16-wide
}


def pack_codes(qw: QuantizedWeight, qtype: T) -> tuple[np.ndarray, tuple[float, float] | None]:
    """GPTQ codes on `qtype`'s own grid (GPTQ_GRIDS, reusable) -> (its block bytes [rows, bytes],
    (|w|², |w - stored|²) of the GPTQ weights w, or None where the bytes hold them exactly)."""
    grid = GPTQ_GRIDS.get(qtype)
    rows, cols = qw.shape
    fits = (grid is not None and grid.reusable and qw.strategy == "group" and qw.group_size == 32 and qw.g_idx is None
            and cols % 32 == 0 and qw.scale.dtype == torch.float16 and qw.symmetric == grid.symmetric
            and (qw.qtype.qmin, qw.qtype.qmax) == (grid.qtype.qmin, grid.qtype.qmax))
    if not fits:
        raise FormatError(f"--format gguf: {qtype.name} cannot hold {qw.qtype.name} codes "
                          f"({qw.strategy} {qw.group_size}, {'sym' if qw.symmetric else 'asym'}, {qw.scale.dtype} scales)")
    off = -int(grid.qtype.qmin)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    out = np.empty((rows, cols // 32 * block_bytes), dtype=np.uint8)
    signal = noise = 0.0
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols // 32
        codes = qw.codes[r0:r1].to("cpu", torch.int32).reshape(n, 32)
        scale = qw.scale[r0:r1].to("cpu").contiguous().reshape(n)
        parts = [quants._bytes16(scale.view(torch.int16))]
        if not grid.symmetric:
            z = qw.zero_point[r0:r1].to("cpu", torch.float32).reshape(n)
            parts.append(quants._bytes16(quants._fp16(-(z + off) * scale.float())[0]))  # exact product, one rounding
        L = codes + off
        if qtype == T.Q8_0:
            parts.append(codes.to(torch.int8).view(torch.uint8))
        elif grid.qtype.bits == 5:
            parts += [quants._qh32(L), quants._pack_nibbles(L)]
        else:
            parts.append(quants._pack_nibbles(L, mask_low=False))
        data = torch.cat(parts, 1).numpy().reshape(r1 - r0, -1)
        out[r0:r1] = data
        if not grid.symmetric:
            w = _rows_of(qw, r0, r1).dequantize(torch.float32).cpu()
            back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(w.shape)
            signal += torch.linalg.vector_norm(w).item() ** 2
            noise += torch.linalg.vector_norm(w - back).item() ** 2
    return out, None if grid.symmetric else (signal, noise)


def _rows_of(qw: QuantizedWeight, r0: int, r1: int) -> QuantizedWeight:
    z = None if qw.zero_point is None else qw.zero_point[r0:r1]
    return replace(qw, codes=qw.codes[r0:r1], scale=qw.scale[r0:r1], zero_point=z)


def _sqnr(err: tuple[float, float] | None) -> float:
    if err is None or err[1] == 0:
        return math.inf
    return -math.inf if err[0] == 0 else 10 * math.log10(err[0] / err[1])


# -- the writer ------------------------------------------------------------------------------------


class _KVWriter(gguf.GGUFWriter):
    """gguf-py's writer where a later value of a key replaces the earlier one silently (as the
    converter's set_gguf_parameters overrides keys of its base class; gguf-py logs a warning)."""

    def add_key_value(self, key, val, vtype, sub_type=None) -> None:
        self.kv_data[0][key] = GGUFValue(value=val, type=vtype, sub_type=sub_type)

    def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
        """gguf-py's packing, with the vocabulary's arrays (tokens, types, scores, merges: 10^5
        items) packed in bulk instead of item by item; the same bytes (tests/test_gguf_writer.py)."""
        if vtype == gguf.GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE:
            packed = _pack_array(val, sub_type)
            if packed is not None:
                return (self._pack("I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type)


_NUMPY_OF = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
             gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
             gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
             gguf.GGUFValueType.FLOAT64: "<f8"}


def _pack_array(val, sub_type) -> bytes | None:
    """A GGUF array of strings or of one numeric type, little-endian, as gguf-py writes it item by
    item (type, count, items); None for what it should pack itself (empty, mixed, nested, bool, a
    value out of range: gguf-py raises its own error)."""
    import operator
    import struct

    VT = gguf.GGUFValueType
    if isinstance(val, (bytes, str)) or not isinstance(val, (list, tuple)) or not val:
        return None
    ltype = sub_type if sub_type is not None else VT.get_type(val[0])
    if sub_type is None and not all(VT.get_type(i) is ltype for i in val):
        return None
    head = struct.pack("<IQ", ltype, len(val))
    if ltype == VT.STRING:
        enc = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
        if not all(isinstance(b, bytes) for b in enc):
            return None
        length = struct.Struct("<Q").pack
        return head + b"".join(length(len(b)) + b for b in enc)
    dt = _NUMPY_OF.get(ltype)
    if dt is None:
        return None
    try:
        if ltype in (VT.FLOAT32, VT.FLOAT64):
            src = np.array([float(v) for v in val], dtype=np.float64)
            arr = src.astype(dt)
            if np.isinf(arr).sum() != np.isinf(src).sum():
                return None  # too large for float32: gguf-py's struct.pack raises
        else:
            arr = np.array([operator.index(v) for v in val], dtype=dt)
    except (TypeError, OverflowError, ValueError):
        return None
    return head + arr.tobytes()



class _BackgroundWrites:
    """Tensor data written by one thread in submission order, while the caller encodes the next
    tensors (numpy's tofile releases the GIL): the disk's time overlaps the quantizers'. At most
    `limit` bytes wait beyond the one being written; a write error is raised to the caller at the
    next submit or at join()."""

    def __init__(self, file: gguf.GGUFWriter, limit: int = 256 << 20) -> None:
        import threading

        self._file, self._limit = file, limit
        self._queue: list[np.ndarray] = []
        self._pending, self._error, self._closed = 0, None, False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="qtool-gguf-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                array = self._queue[0]
            try:
                if self._error is None:
                    self._writes.submit(array)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            with self._cv:
                self._queue.pop(0)
                self._pending -= array.nbytes
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def submit(self, array: np.ndarray) -> None:
        with self._cv:
            while self._pending and self._pending + array.nbytes > self._limit and self._error is None:
                self._cv.wait()
            self._raise()
            self._queue.append(array)
            self._pending += array.nbytes
            self._cv.notify_all()

    def join(self) -> None:
        """Wait for every submitted write; stop the thread; raise its error, if any."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._raise()

    def discard(self) -> None:
        """After a failure: stop writing (what was queued is dropped) and stop the thread."""
        with self._cv:
            self._error = self._error or RuntimeError("discarded")
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

def _folder(source: CheckpointSource) -> Path:
    return source.path if source.path.is_dir() else source.path.parent


@FORMATS.register("gguf")
class GGUFWriter(FormatWriter):
    """Single GGUF file, quantized with llama.cpp's block types and mixtures (see module docstring)."""

    output_is_dir = False
    self_quantizing = True
    qtype_kinds = ("int",)

    def __init__(self, type: str | None = None, dtype: torch.dtype | None = None,
                 imatrix: str | Path | None = None, tensor_type: list[str] | None = None, **options: object) -> None:
        super().__init__(**options)
        # --tensor-type PATTERN=TYPE, llama-quantize's overrides (mixtures.plan_types), in the order given
        self.overrides = tuple(mx.parse_override(t, quants.SUPPORTED) for t in tensor_type or ())
        self.target = None  # --target-bpw / --target-size (qtool/target.py), from the recipe
        self.target_note: str | None = None
        self.estimate_only = False  # a dry run: the target's choice from proxy errors, no weight read
        self._allocated: dict[str, T] | None = None
        # read now, so that a bad file fails (exit 5) before the model is opened
        self.imatrix, self.imatrix_given, self._stats = None, None if imatrix is None else str(imatrix), None
        if imatrix is not None and Path(imatrix).suffix == ".safetensors":
            # a `qtool calibrate` file: checked now, mapped to GGUF tensor names once the config is known (plan)
            from qtool.calib.stats import CalibStats

            self._stats = CalibStats(Path(imatrix), flag="--imatrix")
        elif imatrix is not None:
            self.imatrix = imx.read_imatrix(imatrix)
        self.requested = None
        if type is not None:
            self.requested = mx.resolve(type)
            if self.requested is None:
                names, aliases = ", ".join(mx.MIXTURES), ", ".join(k for k in mx.ALIASES if k.startswith("Q"))
                raise UsageError(f"--type {type!r}: not a GGUF type qtool writes; choose one of: {names} "
                                 f"(llama-quantize aliases: {aliases})")
        if dtype is not None:
            by_dtype = mx.MIXTURES[DTYPE_TO_TYPE[dtype]]
            if self.requested is not None and self.requested != by_dtype:
                raise UsageError(f"--dtype {DTYPE_TO_TYPE[dtype].lower()} contradicts --type {self.requested.name}")
            self.requested = by_dtype
        self.peak_buffered_bytes = 0
        self._file = None

    def check_recipe(self, recipe: QuantRecipe) -> None:
        """GGUF quantizes with llama.cpp's own block types: only the bit-width of a recipe maps."""
        from qtool.target import target_of

        self.target = target_of(recipe)
        if self.target is not None and self.requested is not None:
            raise UsageError(f"--type {self.requested.name} with {self.target.flag()}: the target chooses every tensor's "
                             "type; drop --type (--tensor-type still pins tensors)")
        if self.overrides and self.requested is not None and not self.requested.quantized:
            raise UsageError(f"--tensor-type with --type {self.requested.name}: overrides apply to quantized types "
                             "(llama-quantize ignores them for a float output)")
        if recipe.method != "rtn":
            self._check_calibrated(recipe)
        if recipe.qtype not in BITS_TO_MIXTURE and self.requested is None:
            raise UnsupportedError(f"--format gguf cannot hold {recipe.qtype} weights; choose a --type")
        if recipe.strategy == "group" or recipe.targets or recipe.ignore or not recipe.symmetric:
            raise UsageError("--format gguf: block sizes and per-tensor types come from --type; "
                             "--group-size, --asym, --target and --ignore do not apply")

    def _check_calibrated(self, recipe: QuantRecipe) -> None:
        """A calibration method (GPTQ) quantizes the block linears on each tensor's GGUF grid."""
        if not METHODS.get(recipe.method).needs_calibration:
            raise UnsupportedError(f"--format gguf quantizes with llama.cpp's block types; --method {recipe.method} does not apply (use --type)")
        if self.requested is not None and not self.requested.quantized:
            raise UsageError(f"--type {self.requested.name} keeps the weights in floating point: "
                             f"--method {recipe.method} needs a quantized --type (e.g. Q4_0, Q4_K_M)")
        params = recipe.method_params
        if params.get("act_order") and not params.get("static_groups"):
            raise UsageError("--format gguf: --act-order needs --static-groups here: a GGUF block is 32 consecutive "
                             "columns, act-order's dynamic groups are not")

    def calibration_specs(self, source: CheckpointSource, recipe: QuantRecipe) -> dict[str, LayerSpec]:
        """For a calibration method: the decoder-block linears it quantizes, each on the grid of the
        type the mixture gives its GGUF tensor (GPTQ_GRIDS), with fp16 scales as GGUF stores them.
        The rest (token_embd, output, tensors a mixture keeps in floating point) the writer
        quantizes itself when they reach add_tensor."""
        self.check_recipe(recipe)
        linears = {m.name for m in source.tensors() if block_of(m.name) and m.name.endswith(".weight") and len(m.shape) == 2}
        specs: dict[str, LayerSpec] = {}
        entries = self.plan(source, recipe)
        # a linear whose GGUF tensor is made by more than a row split / permutation (MLA's kv_b
        # split, a transpose) is quantized here from its floats instead
        reshaped = {s for e in entries if not e.takes_codes for s in e.sources}
        for e in entries:
            grid = GPTQ_GRIDS.get(e.qtype)
            if grid is None or not mx.allows_quantization(e.name, e.ne):
                continue
            for s in e.sources:
                if s in linears and s not in reshaped:
                    specs[s] = LayerSpec(s, grid.qtype, "group", grid.group_size, grid.symmetric, scale_dtype=torch.float16,
                                         kgrid=None if grid.reusable else e.qtype.name)
        return specs

    def describe(self) -> str | None:
        if self.target is not None:
            t = self.target
            return f"target-{t.bpw:g}bpw" if t.bpw is not None else f"target-{t.size}B"
        mixture = getattr(self, "mixture", None) or self.requested
        return mixture.name if mixture is not None else None

    # -- planning --------------------------------------------------------------------------------
    def _mixture(self, recipe: QuantRecipe | None, metas: list[TensorMeta]) -> mx.Mixture:
        if self.requested is not None:
            return self.requested
        if recipe is not None:
            return mx.MIXTURES[BITS_TO_MIXTURE[recipe.qtype]]
        return mx.MIXTURES[auto_type(metas)]

    def plan(self, source: CheckpointSource, recipe: QuantRecipe | None = None) -> list[Entry]:
        """Every GGUF tensor with its type, in file order, from shapes and config alone."""
        self.spec = md.arch_spec(source.config)
        self.config = config = md.text_config(source.config)
        metas = _arrival_order(source)
        self.mixture = self._mixture(recipe, metas)
        base = self.mixture.default if not self.mixture.quantized else T[auto_type(metas)]
        planner = _Planner(config, self.spec, base, _folder(source))
        for m in metas:
            planner.add(m)
        planner.check_complete()
        entries = planner.generated() + list(planner.entries.values())
        self.facts = md.model_facts(config, self.spec)
        if self._stats is not None and self.imatrix is None:
            self.imatrix = imx.from_stats(self._stats, config)
        if self.overrides and not self.mixture.quantized:
            raise UsageError(f"--tensor-type with a {self.mixture.name} output: overrides apply to quantized types")
        choices = mx.plan_types({e.name: e.ne for e in entries}, self.mixture, self.facts, {e.name: e.converted for e in entries},
                                has_imatrix=self.imatrix is not None, overrides=self.overrides)
        if self.imatrix is not None:
            by_name = {e.name: e for e in entries}
            for name, weights in imx.check_against_model(self.imatrix, {n: e.ne for n, e in by_name.items()}).items():
                by_name[name].importance = weights
        for e in entries:
            e.qtype, e.note = choices[e.name].qtype, choices[e.name].note
        if self.target is not None:
            self._apply_target(entries, source)
        # file order = completion order under the pipeline's delivery order
        arrival = {m.name: i for i, m in enumerate(metas)}
        entries.sort(key=lambda e: max((arrival[s] for s in e.sources), default=-1))
        self.skipped = planner.skipped
        return entries

    def _apply_target(self, entries: list[Entry], source: CheckpointSource) -> None:
        """The target's per-tensor types (computed once: plan() runs again in begin())."""
        from qtool.formats.gguf.target import allocate_types, file_type

        if self._allocated is None:
            pinned = {e.name for e in entries if any(o.hits(e.name) for o in self.overrides)}
            choice = allocate_types(entries, source, self.target, pinned=pinned, proxy=self.estimate_only,
                                    header_bytes=lambda: self._header_bytes(source, entries))
            self.target_note = choice.note
            self._allocated = {e.name: e.qtype for e in entries}
        for e in entries:
            if e.name in self._allocated and e.qtype != self._allocated[e.name]:
                e.qtype, e.note = self._allocated[e.name], None
        self.mixture = file_type(entries)

    def _header_bytes(self, source: CheckpointSource, entries: list[Entry]) -> int:
        """The bytes before the tensor data (header, metadata with the tokenizer, tensor infos),
        measured by writing them to a scratch file; plus room for the type name's length."""
        import tempfile

        self.entries = entries
        w = _KVWriter(path=None, arch=self.spec.name)
        self._metadata(w, source)
        for e in entries:
            w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
        with tempfile.TemporaryDirectory(prefix="qtool-gguf-header-") as d:
            w.write_header_to_file(path=Path(d) / "header.gguf")
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            size = w.fout[0].tell()
            w.close()
        return size + 64

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        if recipe is not None:
            self.check_recipe(recipe)
        self.out = Path(out)
        self.prepare(source, recipe)
        w = _KVWriter(path=None, arch=self.spec.name)
        self._metadata(w, source)
        for e in self.entries:
            w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
        w.write_header_to_file(path=self.out)
        w.write_kv_data_to_file()
        self._provenance_at = w.fout[0].tell() - PROVENANCE_BYTES
        w.write_ti_data_to_file()
        self._file = w
        self._writes = _BackgroundWrites(w)
        for e in self.entries:
            if e.const is not None:
                e.data[0] = encode(e.const, e.qtype)[0]
        self._flush()

    def prepare(self, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        """The plan and each source tensor's routes, without a file: what begin() starts from, and
        all that the other ranks of a run over several processes need to encode their share of
        the tensors (encode_tensor) for rank 0 to write (put_encoded)."""
        self.entries = self.plan(source, recipe)
        self._routes: dict[str, list[tuple[Entry, int]]] = {}
        for e in self.entries:
            for i, s in enumerate(e.sources):
                self._routes.setdefault(s, []).append((e, i))
        self._next = 0

    def _metadata(self, w: gguf.GGUFWriter, source: CheckpointSource) -> None:
        shared = sum(math.prod(e.shape) for e in self.entries if "_exps." not in e.name)
        experts = sum(math.prod(e.shape) for e in self.entries if "_exps." in e.name)
        n_exp = self.facts.n_expert
        params = (shared + experts, shared, experts // max(n_exp, 1), n_exp)
        from_gguf = source.path.is_file() and source.path.suffix == ".gguf"
        if from_gguf:
            md.write_general_from_gguf(w, source.path)
        else:
            folder = source.path if source.path.is_dir() else None
            md.write_general(w, folder, source.path.name.removesuffix(".safetensors"), params)
        md.write_hparams(w, self.config, self.spec, self.mixture)
        if from_gguf:
            tk.copy_vocab_from_gguf(w, source.path)
        else:
            tk.write_vocab_from_folder(w, _folder(source), self.config, self.spec)
        if self.imatrix is not None:  # the keys llama-quantize --imatrix adds
            for key, value in imx.metadata(self.imatrix, self.imatrix_given):
                (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
        w.add_quantized_by(f"qtool {__version__}")
        w.add_string("qtool.type", self.mixture.name)
        w.add_string(PROVENANCE_KEY, " " * PROVENANCE_BYTES)  # filled in by finish(); must stay last

    # -- streaming -------------------------------------------------------------------------------
    def add_quantized(self, name: str, qw: QuantizedWeight) -> TensorOutcome:
        """A linear a calibration method quantized on the grid calibration_specs gave it: its codes
        and scales go into the blocks as they are where the tensor's type holds that grid, otherwise
        its dequantized weights are re-quantized with the type. The outcome's SQNR is that of the
        stored weights against the method's (inf where they are the same)."""
        routes = self._routes.pop(name, None)
        if routes is None:
            raise FormatError(f"--format gguf: tensor {name} was not in the plan (or came twice)")
        signal = noise = 0.0
        bits, kinds, notes = 0, [], []
        for entry, part in routes:
            grid = GPTQ_GRIDS.get(entry.qtype)
            if grid is None or not entry.takes_codes:
                raise FormatError(f"--format gguf: {entry.name} ({entry.qtype.name}) cannot take quantized weights")
            q = self._route_rows(entry, qw)
            if q.kblock is not None and q.kblock.grid.name == entry.qtype.name:  # tuned on this K grid: exact
                data, err = pack_k(q.kblock, q.codes.to(torch.int32) - q.qtype.qmin), None
            elif grid.reusable:
                data, err = pack_codes(q, entry.qtype)
                if err is not None:
                    notes.append(f"{entry.qtype.name}: GPTQ codes kept, offsets rounded to fp16 "
                                 f"(SQNR vs GPTQ weights {_sqnr(err):.0f} dB)")
            else:
                data, err = encode(q.dequantize(torch.float32), entry.qtype, self._importance(entry, part))
                notes.append(f"{entry.qtype.name}: GPTQ grid not reusable, re-quantized "
                             f"(SQNR vs GPTQ weights {_sqnr(err):.0f} dB)")
            entry.data[part] = data
            bits += data.nbytes * 8
            kinds.append(entry.qtype.name)
            if entry.note:
                notes.append(entry.note)
            if err is not None:
                signal, noise = signal + err[0], noise + err[1]
        self._flush()
        sqnr = _sqnr((signal, noise) if noise else None)
        return TensorOutcome("+".join(dict.fromkeys(kinds)), bits, sqnr, "; ".join(dict.fromkeys(notes)) or None)

    @staticmethod
    def _route_rows(entry: Entry, qw: QuantizedWeight) -> QuantizedWeight:
        """The rows of `qw` this entry takes, in GGUF's row order (Q/K rows permuted)."""
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if entry.rows is not None:
                t = t[entry.rows[0]:entry.rows[1]]
            return permute_qk_rows(t, entry.transform[1]) if entry.transform is not None else t

        return replace(qw, codes=rows(qw.codes), scale=rows(qw.scale), zero_point=rows(qw.zero_point),
                       kblock=None if qw.kblock is None else qw.kblock.rows(rows))

    def add_tensor(self, name: str, t: torch.Tensor) -> TensorOutcome | None:
        return self.put_encoded(name, self.encode_tensor(name, t))

    def takes(self, name: str) -> bool:
        """Does the plan encode the source tensor `name` (still to come)?"""
        return name in self._routes

    def encode_tensor(self, name: str, t: torch.Tensor) -> list | None:
        """The encoded blocks of every entry part the source tensor `name` feeds, in route order
        (None: a tensor the plan skips); the writer's state is unchanged."""
        routes = self._routes.get(name)
        if routes is None:
            if name in self.skipped:
                return None
            raise FormatError(f"--format gguf: tensor {name} was not in the plan (or came twice)")
        return [encode(entry.apply(t), entry.qtype, self._importance(entry, part)) for entry, part in routes]

    def put_encoded(self, name: str, encoded: list | None) -> TensorOutcome | None:
        """encode_tensor's result for `name` into the file order (written as soon as it is next)."""
        if encoded is None:
            return None
        routes = self._routes.pop(name, None)
        if routes is None:
            raise FormatError(f"--format gguf: tensor {name} was not in the plan (or came twice)")
        signal = noise = 0.0
        bits, kinds, notes, counted = 0, [], [], False
        for (entry, part), (data, err) in zip(routes, encoded):
            entry.data[part] = data
            if mx.allows_quantization(entry.name, entry.ne):
                counted = True
                bits += data.nbytes * 8
                kinds.append(entry.qtype.name)
                if entry.note:
                    notes.append(entry.note)
                if err is not None:
                    signal += err[0]
                    noise += err[1]
        self._flush()
        if not counted:
            return None
        sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
        return TensorOutcome("+".join(dict.fromkeys(kinds)), bits, sqnr, "; ".join(dict.fromkeys(notes)) or None)

    @staticmethod
    def _importance(entry: Entry, part: int) -> torch.Tensor | None:
        """The imatrix weights for one arriving part: expert `part` of a stack, else all of them."""
        if entry.importance is None or entry.qtype not in quants.IMATRIX_SUPPORTED:
            return None
        return entry.importance[part:part + 1] if len(entry.sources) > 1 else entry.importance

    @property
    def imatrix_note(self) -> str | None:
        """For the run's notes: which imatrix was used, and on how many tensors it acted (and what a
        --target chose)."""
        if self.imatrix is None:
            return self.target_note
        used = sum(e.importance is not None and e.qtype in quants.IMATRIX_SUPPORTED for e in getattr(self, "entries", []))
        note = f"{self.imatrix.describe()}; weighted the rounding of {used} tensors"
        return note + (f"; {self.target_note}" if self.target_note else "")

    def _flush(self) -> None:
        """Write every entry at the head of the file order that has all its parts."""
        while self._next < len(self.entries):
            e = self.entries[self._next]
            if len(e.data) < max(len(e.sources), 1):
                break
            parts = [e.data[i] for i in range(len(e.data))]
            array = parts[0] if len(parts) == 1 else np.stack(parts)
            if array.nbytes != e.nbytes:
                raise FormatError(f"--format gguf: {e.name}: {array.nbytes} bytes, planned {e.nbytes}")
            self._file.write_tensor_data(array)
            e.data.clear()
            self._next += 1
        buffered = sum(a.nbytes for e in self.entries[self._next:] for a in e.data.values())
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, buffered)

    def finish(self, config: dict, provenance: dict) -> None:
        if self._next < len(self.entries):
            raise FormatError(f"--format gguf: {len(self.entries) - self._next} tensor(s) never arrived, "
                              f"first {self.entries[self._next].name}")
        if self.imatrix is not None:
            provenance = {**provenance, "imatrix": {"file": self.imatrix_given, "entries": len(self.imatrix.entries),
                                                    "chunks": self.imatrix.chunk_count, "datasets": self.imatrix.datasets}}
        record = json.dumps({"qtool_version": __version__, "gguf_type": self.mixture.name, **provenance},
                            sort_keys=True, ensure_ascii=True)
        if len(record) > PROVENANCE_BYTES:  # very many input shards: keep the recipe, drop the file list
            provenance = {**provenance, "inputs": {"files": len(provenance.get("inputs", {}))}}
            record = json.dumps({"qtool_version": __version__, "gguf_type": self.mixture.name, **provenance},
                                sort_keys=True, ensure_ascii=True)[:PROVENANCE_BYTES]
        self._writes.join()
        f = self._file.fout[0]
        f.flush()
        f.seek(self._provenance_at)
        f.write(record.ljust(PROVENANCE_BYTES).encode("ascii"))
        self._file.close()
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            if getattr(self, "_writes", None) is not None:
                self._writes.discard()
            self._file.close()
            self._file = None
