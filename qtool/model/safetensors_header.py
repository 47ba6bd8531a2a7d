"""Read and validate a safetensors header without reading (or downloading) the tensor data.

The format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data.
We check everything a corrupted or truncated file can get wrong, so that a bad file fails here with
its name in the message instead of deep inside a reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from qtool.errors import FormatError

if TYPE_CHECKING:
    import torch

# safetensors dtype string -> bytes per element. Torch-free, so that reading a header (`inspect`)
# never pays for importing torch; `ST_DTYPES` / `TORCH_TO_ST` (the torch dtypes; writers use
# them) are built on first use.
ST_ITEMSIZE: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def __getattr__(name: str):  # ST_DTYPES: str -> (torch dtype, bytes per element); TORCH_TO_ST: the inverse
    if name not in ("ST_DTYPES", "TORCH_TO_ST"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    st = {k: (getattr(torch, _TORCH_NAMES[k]), ST_ITEMSIZE[k]) for k in ST_ITEMSIZE}
    globals().update(ST_DTYPES=st, TORCH_TO_ST={v[0]: k for k, v in st.items()})
    return globals()[name]


MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, _TORCH_NAMES[self.dtype])

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    header_size: int  # bytes of JSON
    data_size: int  # bytes after the header, as the header describes them

    @property
    def file_size(self) -> int:
        return 8 + self.header_size + self.data_size


def parse_header(raw: bytes, where: str, actual_data_size: int | None = None) -> SafetensorsHeader:
    """Validate a header given its JSON bytes. `actual_data_size`: bytes available after the header
    (None when unknown, e.g. a remote file whose size we did not ask for)."""
    try:
        obj = json.loads(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: corrupted safetensors header (not valid JSON: {e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: corrupted safetensors header (not a JSON object)")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{where}: corrupted safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, HeaderEntry] = {}
    for name, info in obj.items():
        entries[name] = _entry(name, info, where)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise FormatError(f"{where}: tensor {name!r} data does not follow the previous tensor (offset {begin}, expected {pos})")
        pos = end
    if actual_data_size is not None and pos > actual_data_size:
        raise FormatError(
            f"{where}: truncated: the header describes {pos} bytes of tensor data but the file holds {actual_data_size}"
        )
    return SafetensorsHeader(entries, dict(metadata), len(raw), pos)


def _entry(name: str, info: object, where: str) -> HeaderEntry:
    try:
        dtype = info["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as infinity
        raise FormatError(f"{where}: corrupted safetensors header entry for tensor {name!r}") from None
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    e = HeaderEntry(name, dtype, shape, begin, end)
    if any(d < 0 for d in shape) or begin < 0 or end < begin or end - begin != e.numel * ST_ITEMSIZE[dtype]:
        raise FormatError(f"{where}: tensor {name!r}: offsets {begin}..{end} do not fit dtype {dtype} shape {list(shape)}")
    return e


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{where}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{where}: corrupted safetensors header (claims {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{where}: cannot read: {e.strerror}") from None
    return parse_header(raw, where, size - 8 - n)


HQQ_WEIGHTS_FILE = "qmodel.pt"  # hqq's one-pickle layout (qtool/formats/hqq.py)


def is_hqq_folder(folder: Path) -> bool:
    """A folder in hqq's own layout (config.json + qmodel.pt), told from file names alone."""
    return folder.is_dir() and (folder / HQQ_WEIGHTS_FILE).is_file() and (folder / "config.json").is_file()
