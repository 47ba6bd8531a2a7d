"""llama.cpp importance-matrix (imatrix) files: read both layouts, write the GGUF one.

An imatrix holds, per weight matrix the model multiplies activations with, the sum over calibration
tokens of each input column's x² (`Σx²`) and the number of tokens. llama-quantize divides one by the
other and hands the per-column mean of x² to the block quantizers as weights of their error
(`quantize_tensor(..., imatrix=...)`). Names are GGUF tensor names (`blk.0.attn_q.weight`).

The two layouts this llama.cpp revision (llama-cpp-python 0.3.36's vendor tree: tools/imatrix,
common/imatrix-loader, tools/quantize) knows:

* **GGUF** (what `llama-imatrix` writes by default, whatever the file suffix): `general.type` =
  "imatrix", `imatrix.datasets` (array of strings), `imatrix.chunk_count` and `imatrix.chunk_size`
  (u32; llama-quantize refuses the file without these three), and per entry two F32 tensors,
  `<name>.in_sum2` (raw Σx², ne = [cols, n_mat]) and `<name>.counts` (tokens, ne = [1, n_mat]);
  n_mat is the number of experts for stacked MoE tensors (`*_exps`), else 1. Entries in byte order
  of their names. The importance is `in_sum2 / count` per expert, or 1 where an expert saw no token.
* **legacy `.dat`** (`--output-format dat`): int32 n_entries; per entry int32 name length, name,
  int32 ncall (chunks), int32 n_values, float32 values already divided by the token count and
  multiplied by ncall; then, optionally, int32 chunk count and int32 length + dataset name. The
  importance is `values / ncall` (the values as stored where ncall is 0).

`read_imatrix` accepts either (GGUF magic first, as llama.cpp tries). `write_imatrix` takes what
`qtool calibrate` collects, keyed by Hugging Face module names, maps them to GGUF names with the
GGUF writer's own planner and writes the GGUF layout byte for byte as llama-imatrix does (the
legacy layout for a `.dat` path, converted as llama-imatrix `--output-format dat` converts;
`save_imatrix` writes an `Imatrix` back in whichever layout it holds).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from qtool.errors import FormatError, NumericalError, UnsupportedError, UsageError
from qtool.io import atomic_output

T = gguf.GGMLQuantizationType
GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; llama-imatrix sets no general.alignment
KEY_TYPE, KEY_DATASETS = "general.type", "imatrix.datasets"
KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    """One weight's statistics as stored. GGUF: `sums` raw Σx² [n_mat, cols], `counts` tokens per
    matrix [n_mat]. Legacy: `sums` the stored values [1, n_values], `counts` [ncall]."""

    sums: np.ndarray  # float32, 2-D
    counts: np.ndarray  # int64, 1-D


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, ImatrixEntry]  # GGUF tensor name -> statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # tokens per chunk (0 in legacy files)
    legacy: bool = False

    def importance(self, name: str) -> np.ndarray:
        """What llama-quantize hands the quantizer for `name`: float32 [n_mat * cols], the mean x² of
        each column (per expert, experts one after the other)."""
        e = self.entries[name]
        if self.legacy:
            ncall = int(e.counts[0])
            flat = e.sums.reshape(-1)
            return flat / np.float32(ncall) if ncall > 0 else flat.copy()
        out = np.ones_like(e.sums)
        seen = e.counts > 0
        # float32 / float32, correctly rounded, as the C loader's `sums[i] / (float) count`
        out[seen] = e.sums[seen] / e.counts[seen].astype(np.float32)[:, None]
        return out.reshape(-1)

    def describe(self) -> str:
        chunks = f" from {self.chunk_count} chunk(s)" + (f" of {self.chunk_size} tokens" if self.chunk_size else "")
        data = f" of {', '.join(self.datasets)}" if self.datasets else ""
        return f"imatrix {self.path}: {len(self.entries)} entries{chunks}{data}"


# -- reading ------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> Imatrix:
    """Either layout -> Imatrix; anything malformed is a FormatError naming the file (and entry)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise FormatError(f"{path}: cannot read imatrix file: {e.strerror or e}") from None
    imx = _read_gguf(path) if head == GGUF_MAGIC else _read_legacy(path)
    if not imx.entries:
        raise FormatError(f"{path}: imatrix file holds no entries")
    for name, e in imx.entries.items():
        _check_entry(path, name, e)
    return imx


def _check_entry(path: Path, name: str, e: ImatrixEntry) -> None:
    if (e.counts < 0).any():
        raise FormatError(f"{path}: entry {name}: negative token count {int(e.counts.min())}")
    if not np.isfinite(e.sums).all():
        raise FormatError(f"{path}: entry {name}: non-finite value in its sums of squares")
    if (e.sums < 0).any():
        raise FormatError(f"{path}: entry {name}: negative sum of squares {float(e.sums.min())}")


def _read_gguf(path: Path) -> Imatrix:
    from qtool.model.gguf_source import open_gguf, read_field  # the model reader's vetted parser

    reader = open_gguf(path)
    kind = read_field(reader, KEY_TYPE, path)
    if kind is not None and kind != "imatrix":
        raise FormatError(f"{path}: a GGUF {kind!r} file, not an importance matrix (general.type 'imatrix')")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if reader.get_field(k) is None]
    if missing:  # llama-quantize: "missing imatrix metadata"
        raise FormatError(f"{path}: not an imatrix file: missing metadata {', '.join(missing)}")
    counts_meta = {}
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        f = reader.get_field(key)
        if f.types != [gguf.GGUFValueType.UINT32]:
            raise FormatError(f"{path}: metadata {key} must be a uint32, found {'/'.join(t.name for t in f.types)}")
        counts_meta[key] = int(f.contents())
    datasets = read_field(reader, KEY_DATASETS, path)
    if not (isinstance(datasets, list) and all(isinstance(d, str) for d in datasets)):
        raise FormatError(f"{path}: metadata {KEY_DATASETS} must be an array of strings")
    sums, counts = {}, {}
    for t in reader.tensors:
        for suffix, into in ((SUM_SUFFIX, sums), (COUNT_SUFFIX, counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != T.F32:
                    raise FormatError(f"{path}: tensor {t.name} is {t.tensor_type.name}, imatrix data must be F32")
                into[t.name.removesuffix(suffix)] = np.array(t.data, dtype=np.float32).reshape(-1)
    entries = {}
    for name in sorted(sums.keys() | counts.keys()):
        if name not in sums or name not in counts:
            have, lack = (SUM_SUFFIX, COUNT_SUFFIX) if name in sums else (COUNT_SUFFIX, SUM_SUFFIX)
            raise FormatError(f"{path}: entry {name}: has {name}{have} but no {name}{lack}")
        s, c = sums[name], counts[name]
        if not (np.isfinite(c) & (np.abs(c) < 2.0**62)).all():
            raise FormatError(f"{path}: entry {name}: token count out of range")
        if c.size == 0 or s.size % c.size:
            raise FormatError(f"{path}: entry {name}: {s.size} sums do not split into {c.size} matrices")
        rounded = np.where(c >= 0, np.floor(c + 0.5), np.ceil(c - 0.5))  # C lround: half away from zero
        entries[name] = ImatrixEntry(s.reshape(c.size, -1), rounded.astype(np.int64))
    return Imatrix(path, entries, list(datasets), counts_meta[KEY_CHUNK_COUNT], counts_meta[KEY_CHUNK_SIZE])


class _Cursor:
    """Little-endian reads over the bytes of a legacy file; running out is a FormatError."""

    def __init__(self, path: Path, raw: bytes):
        self.path, self.raw, self.at = path, raw, 0

    def left(self) -> int:
        return len(self.raw) - self.at

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.left() < n:
            raise FormatError(f"{self.path}: truncated imatrix file: reading {what} takes {n} bytes at offset "
                              f"{self.at}, {max(self.left(), 0)} left")
        self.at += n
        return self.raw[self.at - n:self.at]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def text(self, n: int, what: str) -> str:
        raw = self.take(n, what).split(b"\0", 1)[0]  # the C reader keeps the name up to a NUL
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not UTF-8 text") from None


def _read_legacy(path: Path) -> Imatrix:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read imatrix file: {e.strerror or e}") from None
    cur = _Cursor(path, raw)
    if len(raw) < 4:
        raise FormatError(f"{path}: not an imatrix file: {len(raw)} bytes, neither GGUF nor llama.cpp's .dat layout")
    n = cur.i32("the entry count")
    if n < 1 or n * 16 > len(raw):  # each entry takes at least 16 bytes
        raise FormatError(f"{path}: not an imatrix file (neither GGUF, magic {raw[:4]!r}, nor the .dat "
                          f"layout: it would hold {n} entries)")
    entries = {}
    for i in range(1, n + 1):
        length = cur.i32(f"entry {i}'s name length")
        name = cur.text(length, f"entry {i}'s name")
        ncall = cur.i32(f"entry {name}'s chunk count")
        nval = cur.i32(f"entry {name}'s value count")
        if nval < 1:
            raise FormatError(f"{path}: entry {name}: {nval} values")
        values = np.frombuffer(cur.take(4 * nval, f"entry {name}'s {nval} values"), dtype="<f4")
        entries[name] = ImatrixEntry(values.astype(np.float32).reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunks, datasets = 0, []
    if cur.left() >= 4:  # optional trailer: chunk count, then the dataset name
        chunks = cur.i32("the chunk count")
        if cur.left() >= 4:
            length = cur.i32("the dataset name length")
            if 0 < length <= cur.left():
                datasets.append(cur.text(length, "the dataset name"))
    return Imatrix(path, entries, datasets, chunks, 0, legacy=True)


# -- writing ------------------------------------------------------------------------------------


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_bytes(imx: Imatrix) -> bytes:
    """The GGUF layout as ggml's gguf_write_to_file lays it out for llama-imatrix: header, the four
    metadata values, tensor infos (n_dims as ggml_n_dims counts them), then each tensor's data
    padded to ALIGNMENT."""
    V = gguf.GGUFValueType
    kv = [
        _gguf_string(KEY_TYPE) + struct.pack("<I", V.STRING) + _gguf_string("imatrix"),
        _gguf_string(KEY_DATASETS) + struct.pack("<IIQ", V.ARRAY, V.STRING, len(imx.datasets))
        + b"".join(_gguf_string(d) for d in imx.datasets),
        _gguf_string(KEY_CHUNK_COUNT) + struct.pack("<II", V.UINT32, imx.chunk_count),
        _gguf_string(KEY_CHUNK_SIZE) + struct.pack("<II", V.UINT32, imx.chunk_size),
    ]
    tensors: list[tuple[str, tuple[int, ...], bytes]] = []
    for name in sorted(imx.entries, key=lambda s: s.encode("utf-8")):
        e = imx.entries[name]
        n_mat, cols = e.sums.shape
        tensors.append((name + SUM_SUFFIX, (cols, n_mat), e.sums.astype("<f4").tobytes()))
        tensors.append((name + COUNT_SUFFIX, (1, n_mat), e.counts.astype("<f4").tobytes()))
    infos, data, offset = [], [], 0
    for name, ne, payload in tensors:
        dims = ne[:2] if ne[1] > 1 else ne[:1]  # ggml_n_dims: a trailing 1 does not count
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(dims)}qIQ", len(dims), *dims, T.F32, offset))
        padded = payload + b"\0" * (-len(payload) % ALIGNMENT)
        data.append(padded)
        offset += len(padded)
    head = GGUF_MAGIC + struct.pack("<Iqq", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % ALIGNMENT) + b"".join(data)


def _legacy_bytes(imx: Imatrix) -> bytes:
    parts = [struct.pack("<i", len(imx.entries))]
    for name in sorted(imx.entries, key=lambda s: s.encode("utf-8")):
        e = imx.entries[name]
        b = name.encode("utf-8")
        parts.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", int(e.counts[0]), e.sums.size))
        parts.append(e.sums.astype("<f4").tobytes())
    dataset = (imx.datasets[-1] if imx.datasets else "").encode("utf-8")
    parts.append(struct.pack("<ii", imx.chunk_count, len(dataset)) + dataset)
    return b"".join(parts)


def to_legacy(imx: Imatrix) -> Imatrix:
    """GGUF statistics -> the .dat layout, as llama-imatrix's save_imatrix_legacy computes it: per
    entry ncall = ceil(most tokens / chunk_size), values (Σx² / count) * ncall in float32 (1 * ncall
    for a matrix that saw no token); entries that saw no token at all are left out."""
    if imx.legacy:
        return imx
    if imx.chunk_size < 1:
        raise UsageError(f"{imx.path}: the .dat layout needs a chunk size (tokens per chunk) >= 1")
    entries = {}
    for name, e in imx.entries.items():
        if not (e.counts > 0).any():
            continue
        ncall = np.float32((int(e.counts.max()) + imx.chunk_size - 1) // imx.chunk_size)
        count = e.counts.astype(np.float32)[:, None]
        seen = count > 0
        values = np.where(seen, e.sums / np.where(seen, count, np.float32(1)), np.float32(1)) * ncall
        entries[name] = ImatrixEntry(values.astype(np.float32).reshape(1, -1), np.array([int(ncall)], dtype=np.int64))
    return Imatrix(imx.path, entries, imx.datasets, imx.chunk_count, 0, legacy=True)


def save_imatrix(path: str | Path, imx: Imatrix, *, overwrite: bool = False) -> Path:
    """Write `imx` in its own layout (GGUF unless it was read from a legacy file), atomically."""
    path = Path(path)
    payload = _legacy_bytes(imx) if imx.legacy else _gguf_bytes(imx)
    with atomic_output(path, overwrite=overwrite, is_dir=False) as tmp:
        try:
            tmp.write_bytes(payload)
        except OSError as e:
            raise FormatError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


def write_imatrix(
    path: str | Path,
    entries: Mapping[str, tuple[torch.Tensor | np.ndarray, int | Sequence[int]]],
    *,
    config: dict,
    datasets: Sequence[str],
    chunks: int,
    chunk_size: int | None = None,
    overwrite: bool = False,
) -> Imatrix:
    """Write a GGUF imatrix from calibration statistics keyed by Hugging Face module (or weight) names.

    `entries[name] = (sum_x2, tokens)`: Σx² of each input column of that linear layer over the
    calibration tokens (float [in_features]) and how many tokens it saw. A fused expert tensor
    (`...experts.gate_up_proj`) takes [n_experts, in_features] and one count per expert. Experts of
    a MoE layer given one by one (`...experts.3.w1`) are stacked like the GGUF writer stacks them;
    experts that are absent get count 0 (llama-quantize then weighs their columns equally).
    `chunks`: calibration windows; `chunk_size`: tokens per window (default: most tokens / chunks).
    An `lm_head` entry is dropped when the embeddings are tied: such a model has no output.weight.
    A path ending in `.dat` gets the legacy layout (`to_legacy`), any other the GGUF one.
    """
    imx = build_imatrix(path, entries, config=config, datasets=datasets, chunks=chunks, chunk_size=chunk_size)
    if Path(path).suffix == ".dat":
        imx = to_legacy(imx)
    save_imatrix(path, imx, overwrite=overwrite)
    return imx


def build_imatrix(path, entries, *, config, datasets, chunks, chunk_size=None) -> Imatrix:
    """`write_imatrix` without the writing: the GGUF-named Imatrix."""
    from qtool.formats.gguf import metadata as md
    from qtool.formats.gguf.writer import _Planner
    from qtool.model.source import TensorMeta

    if chunks < 0 or (chunk_size is not None and chunk_size < 0):
        raise UsageError(f"imatrix: chunks ({chunks}) and chunk size ({chunk_size}) must be >= 0")
    planner = _Planner(config, md.arch_spec(config), T.F32)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for hf, (sum_x2, tokens) in entries.items():
        weight = hf if hf.endswith(".weight") else hf + ".weight"
        s = np.asarray(sum_x2.detach().cpu().double() if isinstance(sum_x2, torch.Tensor) else sum_x2, dtype=np.float64)
        c = np.atleast_1d(np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64))
        if s.ndim not in (1, 2) or s.shape[-1] == 0 or (s.ndim == 2 and c.size != s.shape[0]) or (s.ndim == 1 and c.size != 1):
            raise UsageError(f"imatrix entry {hf}: sums of shape {tuple(s.shape)} with {c.size} count(s)")
        if not np.isfinite(s).all():
            raise NumericalError(f"imatrix entry {hf}: non-finite sum of squares (activations overflow?)")
        if (s < 0).any() or (c < 0).any():
            raise UsageError(f"imatrix entry {hf}: negative sum of squares or token count")
        stats[weight] = (s.reshape(-1, s.shape[-1]), c)
        shape = (s.shape[0], 1, s.shape[-1]) if s.ndim == 2 else (1, s.shape[-1])
        try:
            planner.add(TensorMeta(weight, shape, torch.float32))
        except UnsupportedError:
            raise UnsupportedError(f"imatrix entry {hf}: no llama.cpp tensor of {config.get('model_type')} takes this input") from None
    tied = bool(config.get("tie_word_embeddings", False))
    out: dict[str, ImatrixEntry] = {}
    for e in planner.entries.values():
        if e.name == "output.weight" and tied:
            continue
        cols = e.shape[-1]
        if len(e.sources) > 1:  # experts given one by one: stack, absent ones with count 0
            sums = np.zeros((len(e.sources), cols))
            counts = np.zeros(len(e.sources), dtype=np.int64)
            for i, src in enumerate(e.sources):
                if src:
                    sums[i], counts[i] = stats[src][0][0], stats[src][1][0]
        else:
            sums, counts = stats[e.sources[0]]
        out[e.name] = ImatrixEntry(sums.astype(np.float32), counts)
    if not out:
        raise UsageError("imatrix: no entries to write")
    if chunk_size is None:
        most = max(int(e.counts.max()) for e in out.values())
        chunk_size = most // chunks if chunks else 0
    return Imatrix(Path(path), out, [str(d) for d in datasets], int(chunks), int(chunk_size))


def check_against_model(imx: Imatrix, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each imatrix entry against the model's GGUF tensors (`shapes`: name -> ne, columns first) ->
    per-tensor importance [n_mat, cols]. An entry naming no tensor of this model, or whose length is
    not columns x matrices (llama-quantize: "imatrix size ... is different from tensor size"), is a
    FormatError. Tensors without an entry are quantized without one, as llama-quantize does."""
    out = {}
    for name in imx.entries:
        if name not in shapes:
            raise FormatError(f"{imx.path}: entry {name}: no such tensor in this model (an imatrix of another model?)")
        ne = shapes[name]
        cols, n_mat = ne[0], (ne[2] if len(ne) > 2 else 1)
        values = imx.importance(name)
        if values.size != cols * n_mat:
            raise FormatError(f"{imx.path}: entry {name}: {values.size} values, the tensor has {cols} columns"
                              + (f" x {n_mat} experts" if n_mat > 1 else ""))
        out[name] = torch.from_numpy(values.reshape(n_mat, cols).copy())
    return out


def metadata(imx: Imatrix, given_as: str) -> list[tuple[str, str | int]]:
    """The `quantize.imatrix.*` keys llama-quantize adds to a file quantized with an imatrix (strings
    cut to 127 bytes as its fixed buffers do; the chunk count only when positive)."""
    keys: list[tuple[str, str | int]] = [("quantize.imatrix.file", _cut(given_as))]
    if imx.datasets:
        keys.append(("quantize.imatrix.dataset", _cut(imx.datasets[0])))
    keys.append(("quantize.imatrix.entries_count", len(imx.entries)))
    if imx.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", imx.chunk_count))
    return keys


def _cut(s: str) -> str:
    b = s.encode("utf-8")[:127]
    return b.decode("utf-8", errors="ignore")


__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix", "save_imatrix", "build_imatrix", "to_legacy",
           "check_against_model", "metadata"]


def from_stats(stats, config: dict) -> Imatrix:
    """A `qtool calibrate` statistics file (qtool.calib.stats.CalibStats) as an importance matrix
    for `config`'s model: its Σx² and token counts, under GGUF names (refused if made for another model)."""
    stats.check_model(config, {})
    c = stats.calibration
    samples = int(c.get("samples") or 0)
    return build_imatrix(stats.path, stats.importance(), config=config, datasets=[str(c.get("spec", ""))],
                         chunks=samples, chunk_size=c.get("seq_len"))
