"""Read a GGUF file's header (metadata and tensor table) fast, without touching tensor data.

`inspect` only needs the header, but gguf-py's `GGUFReader` builds numpy objects for every part
of every field (a 262k-token vocabulary is a million small arrays: ~40 s and ~1 GB), and
importing gguf-py (or torch) costs more than the whole read. This reader walks the header once
over a memory map, keeps scalars and strings, and records arrays as (type, count, offset) spans:
a numeric array is decoded in bulk on demand, a string array is skipped by its length prefixes
without making a Python object per element. Only the pages the header occupies are touched.

Every read is checked against the file size, and each tensor record is vetted (known type id,
whole blocks per row, data inside the file) with the same messages as `gguf_source`'s checked
reader, so a corrupt file is one `FormatError` naming it. gguf-py's own tables (GGML types and
block sizes, file types) are read from its `constants` module alone (stdlib only), not the package.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from qtool.errors import FormatError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9  # GGUF value type ids
# value type id -> struct format of one little-endian element (STRING and ARRAY are variable)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@lru_cache(maxsize=1)
def gguf_constants() -> ModuleType:
    """gguf-py's `constants` module, loaded on its own (it imports only the standard library), so
    its tables come without importing gguf-py's package (numpy, yaml, sentencepiece...)."""
    spec = importlib.util.find_spec("gguf")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "constants.py"
        sub = importlib.util.spec_from_file_location("qtool._gguf_constants", path)
        if sub is not None and sub.loader is not None and path.is_file():
            module = importlib.util.module_from_spec(sub)
            try:
                sub.loader.exec_module(module)
                return module
            except Exception:  # a future gguf-py whose constants import more: use the package
                pass
    import gguf.constants

    return gguf.constants


def ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """GGML type id -> (name, elements per block, bytes per block); None when unknown."""
    c = gguf_constants()
    try:
        t = c.GGMLQuantizationType(type_id)
        return (t.name, *c.GGML_QUANT_SIZES[t])
    except (ValueError, KeyError):
        return None


def file_type_name(value: int) -> str | None:
    """`general.file_type` by llama.cpp's name (MOSTLY_Q8_0 -> Q8_0); None when unknown."""
    try:
        name = gguf_constants().LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


class _BadText(bytes):
    """A string value that is not UTF-8, kept so that only reading it fails."""


class _Corrupt(Exception):
    """A structural problem; the message does not name the file yet."""


@dataclass(frozen=True)
class GGUFArray:
    """An array value not yet decoded: element type, element count, and where its elements start."""

    type: int
    count: int
    offset: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int
    type_name: str
    block_size: int
    dims: tuple[int, ...]  # GGML order: the fastest-varying axis first
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch / Hugging Face order (slowest axis first)."""
        return tuple(reversed(self.dims))


class GGUFHeader:
    """The header of one GGUF file: `fields` (key -> scalar, str or `GGUFArray`) and `tensors`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        size = check_preamble(self.path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self._mm = mm
                try:
                    self._parse(size)
                finally:
                    del self._mm
        except _Corrupt as e:
            raise FormatError(f"{self.path}: corrupt GGUF file: {e}") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read GGUF file: {' '.join(str(e.strerror or e).split())}") from e

    # -- public ---------------------------------------------------------------------------------

    def get(self, key: str):
        """A metadata value, arrays decoded into lists (None when absent); bad UTF-8 is a FormatError."""
        value = self.fields.get(key)
        if isinstance(value, _BadText):
            raise FormatError(f"{self.path}: corrupt GGUF metadata value {key!r}: not UTF-8")
        if not isinstance(value, GGUFArray):
            return value
        try:
            return self._decode_array(value)
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: corrupt GGUF metadata value {key!r}: {e}") from None

    def count(self, key: str) -> int | None:
        """The element count of an array value (None when absent or not an array)."""
        value = self.fields.get(key)
        return value.count if isinstance(value, GGUFArray) else None

    # -- parsing ----------------------------------------------------------------------------------

    def _need(self, offset: int, n: int) -> None:
        if offset + n > self._size:
            raise _Corrupt(f"truncated: a {n}-byte read at offset {offset} runs past the end of the "
                           f"{self._size}-byte file")

    def _u32(self, offset: int) -> int:
        self._need(offset, 4)
        return _U32.unpack_from(self._mm, offset)[0]

    def _u64(self, offset: int) -> int:
        self._need(offset, 8)
        return _U64.unpack_from(self._mm, offset)[0]

    def _bytes(self, offset: int) -> tuple[bytes, int]:
        n = self._u64(offset)
        if offset + 8 + n > self._size:
            raise _Corrupt(f"string at offset {offset} claims {n} bytes, more than the {self._size}-byte file holds")
        return self._mm[offset + 8:offset + 8 + n], offset + 8 + n

    def _string(self, offset: int) -> tuple[str, int]:
        raw, end = self._bytes(offset)
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError as e:
            raise _Corrupt(f"a name at offset {offset} is not UTF-8 ({e.reason})") from None

    def _parse(self, size: int) -> None:
        self._size = size
        self.version = self._u32(4)
        n_tensors, n_kv = self._u64(8), self._u64(16)
        pos = 24
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            if key in self.fields:
                raise _Corrupt(f"duplicate metadata key {key!r}")
            vtype = self._u32(pos)
            self.fields[key], pos = self._value(vtype, pos + 4)
        records = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            n_dims = self._u32(pos)
            self._need(pos + 4, 8 * n_dims + 12)
            dims = struct.unpack_from(f"<{n_dims}Q", self._mm, pos + 4)
            pos += 4 + 8 * n_dims
            type_id, rel = self._u32(pos), self._u64(pos + 4)
            records.append((name, dims, type_id, rel))
            pos += 12
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise _Corrupt(f"general.alignment {alignment!r} is not a positive integer")
        self.alignment = alignment
        self.data_offset = -(-pos // alignment) * alignment
        self.tensors = [self._tensor(*r) for r in records]

    def _value(self, vtype: int, pos: int) -> tuple[object, int]:
        if vtype == STRING:  # a bad value fails when it is read (`get`), as with gguf-py
            raw, pos = self._bytes(pos)
            try:
                return raw.decode("utf-8"), pos
            except UnicodeDecodeError:
                return _BadText(raw), pos
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            n = struct.calcsize(fmt)
            self._need(pos, n)
            return struct.unpack_from("<" + fmt, self._mm, pos)[0], pos + n
        if vtype != ARRAY:
            raise _Corrupt(f"metadata value at offset {pos - 4} has unknown type id {vtype}")
        etype, count = self._u32(pos), self._u64(pos + 4)
        start = pos + 12
        return GGUFArray(etype, count, start), self._skip_array(etype, count, start)

    def _skip_array(self, etype: int, count: int, start: int) -> int:
        if etype in _SCALAR:
            n = struct.calcsize(_SCALAR[etype]) * count
            self._need(start, n)
            return start + n
        if etype != STRING:  # gguf-py cannot read nested arrays either
            raise _Corrupt(f"array at offset {start - 12} has unsupported element type id {etype}")
        self._need(start, 8 * count)  # every string has at least its 8-byte length
        pos, size, unpack = start, self._size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self._need(pos, 8)
            pos += 8 + unpack(self._mm, pos)[0]
        if pos > size:
            raise _Corrupt(f"string array at offset {start} claims {pos - start} bytes, more than the "
                           f"{size}-byte file holds")
        return pos

    def _decode_array(self, a: GGUFArray) -> list:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if a.type in _SCALAR:  # one bulk unpack, no per-element parsing
                return list(struct.unpack_from(f"<{a.count}{_SCALAR[a.type]}", mm, a.offset))
            out, pos = [], a.offset
            for _ in range(a.count):
                (n,) = _U64.unpack_from(mm, pos)
                out.append(mm[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
            return out

    def _tensor(self, name: str, dims: tuple[int, ...], type_id: int, rel: int) -> GGUFTensorInfo:
        t = ggml_type(type_id)
        if t is None:
            raise _Corrupt(f"tensor {name!r} has unknown GGML type id {type_id}")
        type_name, block, type_size = t
        if dims and dims[0] % block:
            raise _Corrupt(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                           f"{type_name} block size {block}")
        begin = self.data_offset + rel
        n_bytes = math.prod(dims) * type_size // block
        if begin > self._size:
            raise _Corrupt(f"tensor {name!r}: data offset {begin} lies past the end of the {self._size}-byte file")
        if begin + n_bytes > self._size:
            raise _Corrupt(f"tensor {name!r}: data (bytes {begin}..{begin + n_bytes}) runs past the end of the "
                           f"{self._size}-byte file (truncated?)")
        return GGUFTensorInfo(name, type_id, type_name, block, tuple(int(d) for d in dims), begin, n_bytes)


def check_preamble(path: Path) -> int:
    """Magic and version from the first 8 bytes; returns the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
    except OSError as e:
        raise FormatError(f"{path}: cannot read GGUF file: {' '.join(str(e.strerror or e).split())}") from e
    if len(head) < 8:
        raise FormatError(f"{path}: not a GGUF file: only {len(head)} bytes long")
    if head[:4] != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file: magic {head[:4]!r}, expected {GGUF_MAGIC!r}")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0 and int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{path}: unsupported GGUF version {version} "
                          f"(readable: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    return size
