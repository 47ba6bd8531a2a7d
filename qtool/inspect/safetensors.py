"""`qtool inspect` for safetensors checkpoints: local folders and files, sharded or not, plain or
compressed-tensors, and Hub repositories read through HTTP Range requests (headers only)."""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.inspect.report import InspectReport, TensorReport, kv_cache_from_config, layer_kind, method_name, parse_provenance
from qtool.model.safetensors_header import MAX_HEADER, ST_ITEMSIZE, SafetensorsHeader, parse_header, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# compressed-tensors: suffixes that make up one quantized module's weight, and bookkeeping ones.
CT_WEIGHT_PARTS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_global_scale")
CT_BOOKKEEPING = ("weight_shape", "weight_g_idx")
CT_ACTIVATION = re.compile(r"^(input|output|q|k|v)_(scale|zero_point|global_scale)$")


# -- safetensors: local files and Hub repositories --------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    nbytes: int
    file: str  # local path, or file name in the repository
    offset: int  # absolute offset of the data in the file


@dataclass
class _Checkpoint:
    source: str
    files: dict[str, int]
    tensors: list[StoredTensor]
    metadata: dict[str, str]  # merged `__metadata__` of the files
    config: dict | None
    provenance: dict | None
    read_ints: Callable[[StoredTensor], list[int]] | None  # None where reading data is not allowed (Hub)


def _stored(header: SafetensorsHeader, file: str) -> list[StoredTensor]:
    base = 8 + header.header_size
    return [StoredTensor(e.name, e.dtype, e.shape, e.end - e.begin, file, base + e.begin)
            for e in sorted(header.entries.values(), key=lambda e: e.begin)]


def weight_files(names: list[str], load_index: Callable[[], dict], where: str) -> list[str]:
    """Which `.safetensors` files hold the model: the shards an index names, else `model.safetensors`,
    else every top-level `.safetensors` (a repository may also carry e.g. a consolidated copy)."""
    if INDEX_FILE in names:
        index = load_index()
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(shards, dict) or not shards:
            raise FormatError(f"{where}/{INDEX_FILE}: no weight_map")
        missing = sorted(set(shards.values()) - set(names))
        if missing:
            raise FormatError(f"{where}: {INDEX_FILE} names shard {missing[0]}, which is missing")
        return sorted(set(shards.values()))
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)


def _no_weights(names: list[str], where: str) -> Exception:
    gguf = [n for n in names if n.endswith(".gguf")]
    if gguf:
        return UsageError(f"{where}: holds GGUF files, not safetensors; inspect one of them: {', '.join(sorted(gguf)[:4])}")
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return UnsupportedError(f"{where}: only pickle weights (*.bin); their layout cannot be read without loading them")
    return FormatError(f"{where}: no *.safetensors or *.gguf weights found")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj


def local_checkpoint(path: Path) -> _Checkpoint:
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: not a model file qtool inspects (.safetensors, .gguf, or a folder)")
        names = [path.name]
    else:
        listing = sorted(p.name for p in folder.iterdir())
        names = weight_files(listing, lambda: _read_json(folder / INDEX_FILE), str(folder))
        if not names:
            raise _no_weights(listing, str(folder))
    tensors, metadata, files = [], {}, {}
    for n in names:
        header = read_header(folder / n)
        tensors += _stored(header, str(folder / n))
        metadata.update(header.metadata)
        files[n] = header.file_size
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    prov = parse_provenance(metadata) or (_read_json(folder / "qtool.json") if (folder / "qtool.json").is_file() else None)
    return _Checkpoint(str(path), files, tensors, metadata, config, prov, _read_local_ints)


# integer safetensors dtypes -> struct format (little-endian), so reading `weight_shape` needs no torch
_INT_FORMATS = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U64": "Q", "U32": "I", "U16": "H", "U8": "B", "BOOL": "?"}


def _read_local_ints(t: StoredTensor) -> list[int]:
    try:
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            raw = f.read(t.nbytes)
    except OSError as e:
        raise FormatError(f"{t.file}: cannot read: {e.strerror}") from None
    if len(raw) != t.nbytes:
        raise FormatError(f"{t.file}: truncated: tensor {t.name!r} runs past the end of the file")
    if t.dtype not in _INT_FORMATS:
        raise FormatError(f"{t.file}: tensor {t.name!r} should hold integers, not {t.dtype}")
    return [int(v) for v in struct.unpack(f"<{len(raw) // int(ST_ITEMSIZE[t.dtype])}{_INT_FORMATS[t.dtype]}", raw)]


# -- the Hub ---------------------------------------------------------------------------------------


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """huggingface_hub's and the transport's exceptions -> one-line FormatErrors naming the repo."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FormatError(f"{repo_id}: not found on the Hub ({type(e).__name__}); check the id, --revision and HF_TOKEN") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass of it
        raise FormatError(f"{repo_id}: not in the local Hub cache and the Hub cannot be reached (offline?)") from None
    except EntryNotFoundError as e:
        raise FormatError(f"{repo_id}: a file is missing on the Hub: {str(e).splitlines()[-1]}") from None
    except HfHubHTTPError as e:
        raise FormatError(f"{repo_id}: Hub request failed: {str(e).splitlines()[0]}") from None
    except _transport_errors() as e:
        raise FormatError(f"{repo_id}: Hub request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2 as httpx  # huggingface_hub >= 2
    except ImportError:
        import httpx  # huggingface_hub 1.x
    return (httpx.HTTPError, httpx.InvalidURL)


def hub_checkpoint(repo_id: str, revision: str | None, token: str | None) -> _Checkpoint:
    from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if constants.is_offline_mode():
        return _cached_checkpoint(repo_id, revision)
    with _hub_errors(repo_id):
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        sha = info.sha or revision
        names = [s.rfilename for s in info.siblings or []]

        def fetch_json(name: str) -> dict:
            return _read_json(Path(hf_hub_download(repo_id, name, revision=sha, token=token)))

        shards = weight_files(names, lambda: fetch_json(INDEX_FILE), repo_id)
        if not shards:
            raise _no_weights(names, repo_id)
        config = fetch_json("config.json") if "config.json" in names else None
        headers = build_hf_headers(token=token)
        tensors, metadata, files = [], {}, {}
        for n in shards:
            header, size = remote_header(hf_hub_url(repo_id, n, revision=sha), headers, f"{repo_id}/{n}")
            tensors += _stored(header, n)
            metadata.update(header.metadata)
            files[n] = size
    return _Checkpoint(repo_id, files, tensors, metadata, config, parse_provenance(metadata), None)


def _cached_checkpoint(repo_id: str, revision: str | None) -> _Checkpoint:
    """Offline: a snapshot that an earlier `qtool quantize` (or any download) left in the cache."""
    from huggingface_hub import snapshot_download

    from qtool.model.resolve import HUB_PATTERNS

    with _hub_errors(repo_id):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
    ck = local_checkpoint(Path(folder))
    ck.source = repo_id
    return ck


def remote_header(url: str, headers: dict, where: str) -> tuple[SafetensorsHeader, int]:
    """A remote safetensors header from two Range requests: bytes 0-7, then the JSON exactly.
    Returns the validated header and the file size (from Content-Range)."""
    head, size = _get_range(url, headers, 0, 7)
    if len(head) < 8:
        raise FormatError(f"{where}: not a safetensors file (only {len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or (size is not None and 8 + n > size):
        raise FormatError(f"{where}: corrupted safetensors header (claims {n} header bytes, file has {size})")
    raw, _ = _get_range(url, headers, 8, 7 + n)
    if len(raw) < n:
        raise FormatError(f"{where}: truncated safetensors header ({len(raw)} of {n} bytes)")
    header = parse_header(raw, where, None if size is None else size - 8 - n)
    return header, size if size is not None else header.file_size


def _get_range(url: str, headers: dict, start: int, end: int) -> tuple[bytes, int | None]:
    """Bytes start..end (inclusive) of a remote file, and the file's total size if the server says.
    Streams, and stops reading once it has them, should a server ignore the Range header."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    req = {**headers, "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=req, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        skip = 0 if r.status_code == 206 else start
        buf = bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= skip + end - start + 1:
                break
        crange = r.headers.get("Content-Range", "")
        total = crange.rsplit("/", 1)[-1] if r.status_code == 206 else r.headers.get("Content-Length")
    size = int(total) if total and total.isdigit() else None
    return bytes(buf[skip: skip + end - start + 1]), size


# -- safetensors -> report -------------------------------------------------------------------------


def safetensors_report(ck: _Checkpoint, ctx: int, batch: int) -> InspectReport:
    config = ck.config or {}
    qconfig = config.get("quantization_config") or {}
    quant_method = qconfig.get("quant_method")
    is_ct = quant_method == "compressed-tensors"
    from qtool.inspect.otf import METHODS as OTF_METHODS, otf_rows

    packed = _packed_layout(config, ck.source)
    is_otf = packed is None and quant_method in OTF_METHODS
    if is_ct:
        tensors = _ct_rows(ck.tensors, qconfig, ck.read_ints)
    elif packed is not None:
        from qtool.inspect.packed import packed_rows

        tensors = packed_rows(ck.tensors, packed)
    elif is_otf:
        tensors = otf_rows(ck.tensors, quant_method, qconfig, ck.metadata, ck.read_ints)
    else:
        tensors = [_plain_row(t) for t in ck.tensors]
    otf = _onthefly_rows(ck, quant_method) if packed is None and not is_otf else None  # optimum-quanto / Quark layouts
    if otf is not None:
        quant_method, tensors = otf
    notes = []
    if ck.config is None:
        notes.append("no config.json: KV cache size unknown")
    if quant_method and not is_ct and packed is None and not is_otf and otf is None:
        notes.append(f"quant_method {quant_method!r}: tensors listed as stored, parameter counts not decoded")
    dtype = _dominant_dtype(ck.tensors)
    if is_ct:
        fmt, detail = "compressed-tensors", qconfig.get("format")
    elif packed is not None:
        fmt, detail = packed.method, packed.label.partition(" (")[2].rstrip(")") or None
    elif quant_method:
        fmt, detail = str(quant_method), None
    else:
        fmt, detail = "safetensors", dtype
    method = method_name(ck.provenance, quantized=bool(quant_method), fallback=str(quant_method) if quant_method and not is_ct else "unknown")
    from qtool.model.arch_facts import light_capabilities

    return InspectReport(ck.source, fmt, detail, method, ck.files, tensors, ctx, batch,
                         kv_cache_from_config(config, ctx, batch), ck.provenance, notes,
                         architecture=light_capabilities(ck.config))


def _packed_layout(config: dict, where: str):
    """The GPTQ / AWQ / AutoRound layout of a checkpoint (int32-packed tensors), else None."""
    from qtool.model.quantized_layout import layout_of

    try:
        layout = layout_of(config, where)
    except UnsupportedError:
        return None  # a variant qtool does not decode: listed as stored, said in a note
    return layout if layout is not None and layout.tensors != "compressed-tensors" else None


def _onthefly_rows(ck: _Checkpoint, quant_method: str | None) -> tuple[str, list[TensorReport]] | None:
    """("quanto" | "quark", rows) where the checkpoint is in one of those layouts (quanto: local only)."""
    from qtool.inspect.onthefly import quanto_rows, quark_rows

    if quant_method == "quark":
        return "quark", quark_rows(ck.tensors, (ck.config or {}).get("quantization_config") or {})
    folder = Path(ck.source)
    folder = folder if folder.is_dir() else folder.parent
    if ck.read_ints is not None and (folder / "quanto_qmap.json").is_file():
        from qtool.formats.quanto import linear_shapes

        shapes = linear_shapes(ck.config) if ck.config else {}
        return "quanto", quanto_rows(ck.tensors, _read_json(folder / "quanto_qmap.json"), shapes)
    return None


def _dominant_dtype(tensors: list[StoredTensor]) -> str | None:
    by_bytes: Counter[str] = Counter()
    for t in tensors:
        if t.dtype.startswith(("F", "BF")):
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def _plain_row(t: StoredTensor) -> TensorReport:
    return TensorReport(t.name, layer_kind(t.name), t.dtype, t.shape, math.prod(t.shape), t.nbytes)


def _ct_rows(tensors: list[StoredTensor], qconfig: dict, read_ints) -> list[TensorReport]:
    modules: dict[str, dict[str, StoredTensor]] = {}
    for t in tensors:
        prefix, _, suffix = t.name.rpartition(".")
        modules.setdefault(prefix, {})[suffix] = t
    rows = []
    for prefix, parts in modules.items():
        quantized = "weight_packed" in parts or "weight_scale" in parts
        for suffix, t in parts.items():
            if quantized and suffix in CT_WEIGHT_PARTS + CT_BOOKKEEPING:
                continue
            if CT_ACTIVATION.match(suffix):
                rows.append(TensorReport(t.name, layer_kind(t.name), t.dtype, t.shape, 0, 0, t.nbytes))
            else:
                rows.append(_plain_row(t))
        if quantized:
            rows.append(_ct_module_row(prefix, parts, _ct_scheme(prefix, qconfig), read_ints))
    return rows


def _ct_scheme(module: str, qconfig: dict) -> dict:
    """The module's `weights` args; where targets name layer classes ("Linear") rather than modules,
    the single config group's."""
    from qtool.formats.compressed_tensors import scheme_for

    args = scheme_for(module, qconfig)
    if args is None:
        groups = [g.get("weights") for g in (qconfig.get("config_groups") or {}).values() if g.get("weights")]
        args = groups[0] if len(groups) == 1 else None
    return args or {}


def _ct_module_row(prefix: str, parts: dict[str, StoredTensor], args: dict, read_ints) -> TensorReport:
    value = parts.get("weight_packed") or parts.get("weight")
    name = f"{prefix}.weight"
    if value is None:
        raise FormatError(f"{prefix}: compressed-tensors module has {', '.join(sorted(parts))} but no weight")
    if "weight_packed" in parts:
        shape = _packed_shape(parts, args, read_ints)
    else:
        shape = value.shape
    stored = sum(parts[s].nbytes for s in CT_WEIGHT_PARTS if s in parts)
    extra = sum(parts[s].nbytes for s in CT_BOOKKEEPING if s in parts)
    return TensorReport(name, layer_kind(name), _ct_label(args, value.dtype), tuple(shape),
                        math.prod(shape), stored, extra, quantized=True)


def _packed_shape(parts: dict[str, StoredTensor], args: dict, read_ints) -> tuple[int, ...]:
    """[out, in] of a pack-quantized weight: its `weight_shape` values where we may read data;
    from headers alone (the Hub), the widest `in` that both the packed width and the group count
    allow (exact whenever `in` fills whole int32 words, i.e. always in practice)."""
    if "weight_shape" in parts and read_ints is not None:
        return tuple(int(v) for v in read_ints(parts["weight_shape"]))
    packed = parts["weight_packed"]
    bits = int(args.get("num_bits") or 4)
    word_bits = int(ST_ITEMSIZE[packed.dtype] * 8)
    out_f, cols = packed.shape[0], packed.shape[-1]
    in_f = cols * word_bits // bits
    scale, g = parts.get("weight_scale"), args.get("group_size")
    if scale is not None and g and args.get("strategy") == "group" and len(scale.shape) == 2:
        in_f = min(in_f, scale.shape[1] * int(g))
    return (out_f, in_f)


def _ct_label(args: dict, value_dtype: str) -> str:
    bits, typ = args.get("num_bits"), args.get("type")
    if typ == "float":
        base = {8: "fp8", 4: "fp4"}.get(bits, f"float{bits}")
    elif typ == "int":
        base = f"int{bits}"
    else:
        return f"{value_dtype} (quantized)"
    strategy = args.get("strategy")
    grid = f"g{args.get('group_size')}" if strategy in ("group", "tensor_group") else (strategy or "?")
    sym = "" if typ == "float" else (" sym" if args.get("symmetric", True) else " asym")
    return f"{base} {grid}{sym}"
