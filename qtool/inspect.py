"""What a checkpoint holds, read from its headers: per-tensor types, bits, shapes, parameter counts
and bytes; totals; the detected format and method; the memory needed to run it.

Works on a folder (plain or compressed-tensors safetensors, single file or sharded), one
`.safetensors` or `.gguf` file, or a Hub id. For a Hub id only `config.json` (and a shard index,
if any) is downloaded; each `.safetensors` header is read with two HTTP Range requests (its 8-byte
length, then exactly its JSON), so no tensor data moves. huggingface_hub's own
`get_safetensors_metadata` always fetches the first 100 kB of each file, which for a small shard
is tensor data too, so we issue the ranges ourselves through its session, URL and auth helpers.

Counting: a parameter is one logical weight element. A pack-quantized module counts the elements
of its `weight_shape`, not of the int32 `weight_packed`; scales and zero points are stored bits of
that weight (they enter its bits per weight) but not parameters; `weight_shape`/`g_idx` and
activation/KV scales are bookkeeping (bytes, but neither parameters nor weight bits).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.model.gguf_source import open_gguf, read_field
from qtool.model.safetensors_header import MAX_HEADER, ST_DTYPES, SafetensorsHeader, parse_header, read_header

KV_BYTES_PER_ELEMENT = 2  # a 16-bit KV cache
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Layer kinds, in display order, with the name patterns (HF and GGUF spellings) that pick them.
# Checked in this order: a norm inside attention is a norm, `embed_out` is the output head.
KINDS = ("attention", "mlp", "moe", "embeddings", "norms", "output", "other")
KIND_LABELS = {"attention": "attention", "mlp": "MLP", "moe": "MoE experts", "embeddings": "embeddings",
               "norms": "norms", "output": "output/lm_head", "other": "other"}
_KIND_RULES = (
    ("norms", re.compile(r"norm|(^|\.)ln(_\w+)?\.")),
    ("output", re.compile(r"(^|\.)lm_head\.|^output\.|(^|\.)embed_out\.")),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe)\.|token_embd|position_embd")),
    ("moe", re.compile(r"experts?\.|_exps\.|_shexp\.|ffn_gate_inp|\.router\.|block_sparse_moe\.gate\.|\.mlp\.gate\.")),
    ("attention", re.compile(r"attn|attention")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|(^|\.)fc\d\.")),
)

# compressed-tensors: suffixes that make up one quantized module's weight, and bookkeeping ones.
CT_WEIGHT_PARTS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_global_scale")
CT_BOOKKEEPING = ("weight_shape", "weight_g_idx")
CT_ACTIVATION = re.compile(r"^(input|output|q|k|v)_(scale|zero_point|global_scale)$")


def layer_kind(name: str) -> str:
    for kind, rx in _KIND_RULES:
        if rx.search(name):
            return kind
    return "other"


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorReport:
    """One parameter tensor (for a quantized module: its weight, all parts together)."""

    name: str
    kind: str
    type: str  # "BF16", "int4 g32 sym", "fp8 channel", "Q8_0"
    shape: tuple[int, ...]  # logical shape
    params: int
    bytes: int  # stored bits of the weight: values + scales + zero points
    extra_bytes: int = 0  # bookkeeping beside it (weight_shape, g_idx, activation scales)
    quantized: bool = False

    @property
    def bits(self) -> float | None:
        return 8 * self.bytes / self.params if self.params else None

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "bits": self.bits}


@dataclass(frozen=True)
class KVCache:
    """KV cache size: sum over layers of kv_heads × (key_length + value_length) × ctx × batch."""

    layers: int
    kv_heads: int | list[int]  # per layer where the model varies it (GGUF arrays)
    key_length: int
    value_length: int
    ctx: int
    batch: int
    bytes_per_element: int = KV_BYTES_PER_ELEMENT

    @property
    def bytes(self) -> int:
        heads = sum(self.kv_heads) if isinstance(self.kv_heads, list) else self.layers * self.kv_heads
        return heads * (self.key_length + self.value_length) * self.ctx * self.batch * self.bytes_per_element


@dataclass
class InspectReport:
    source: str
    format: str  # "safetensors", "compressed-tensors", "gguf", or another quant_method
    format_detail: str | None  # dtype, compressed-tensors format, GGUF file type
    method: str  # "none", the qtool recipe's method, the GGUF file type, or "unknown"
    files: dict[str, int]  # weight file -> bytes
    tensors: list[TensorReport]
    ctx: int
    batch: int
    kv_cache: KVCache | None
    provenance: dict | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # GGUF: model and tokenizer summary

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def params_quantized(self) -> int:
        return sum(t.params for t in self.tensors if t.quantized)

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.bytes + t.extra_bytes for t in self.tensors)

    @property
    def bpw_quantized(self) -> float | None:
        q = [t for t in self.tensors if t.quantized]
        return _bpw(q)

    @property
    def bpw_model(self) -> float | None:
        return _bpw(self.tensors)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.kv_cache is None else self.tensor_bytes + self.kv_cache.bytes

    def groups(self) -> list[dict]:
        """Rows of the summary: one per (layer kind, type), kinds in display order."""
        buckets: dict[tuple[str, str], list[TensorReport]] = {}
        for t in self.tensors:
            buckets.setdefault((t.kind, t.type), []).append(t)
        rows = []
        for (kind, typ), ts in sorted(buckets.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            shapes = Counter(t.shape for t in ts)
            rows.append({
                "kind": kind, "type": typ, "quantized": ts[0].quantized, "tensors": len(ts),
                "shapes": [{"shape": list(s), "count": n} for s, n in shapes.most_common()],
                "params": sum(t.params for t in ts), "bytes": sum(t.bytes + t.extra_bytes for t in ts),
                "bits": _bpw(ts),
            })
        return rows

    def to_dict(self) -> dict:
        kv = self.kv_cache
        return {
            "source": self.source, "format": self.format, "format_detail": self.format_detail,
            "method": self.method,
            "files": [{"name": n, "bytes": b} for n, b in self.files.items()],
            "groups": self.groups(),
            "totals": {
                "params": self.params, "params_quantized": self.params_quantized,
                "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes,
                "bpw_quantized": self.bpw_quantized, "bpw_model": self.bpw_model,
            },
            "memory": {
                "ctx": self.ctx, "batch": self.batch, "weights_bytes": self.tensor_bytes,
                "kv_cache_bytes": kv.bytes if kv else None, "total_bytes": self.memory_bytes,
                "kv_cache": {k: v for k, v in asdict(kv).items() if k not in ("ctx", "batch")} if kv else None,
            },
            "provenance": self.provenance,
            "metadata": self.metadata,
            "notes": self.notes,
            "tensors": [t.to_dict() for t in self.tensors],
        }


def _bpw(tensors: list[TensorReport]) -> float | None:
    params = sum(t.params for t in tensors)
    return 8 * sum(t.bytes for t in tensors) / params if params else None


# -- entry point ---------------------------------------------------------------------------------


def inspect_model(target: str, *, revision: str | None = None, token: str | None = None,
                  ctx: int = 4096, batch: int = 1) -> InspectReport:
    """Inspect a folder, a `.safetensors`/`.gguf` file or a Hub id, reading headers only."""
    from qtool.model.resolve import is_hub_id

    if ctx < 1 or batch < 1:
        raise UsageError(f"--ctx and --batch must be at least 1 (got ctx={ctx}, batch={batch})")
    path = Path(target).expanduser()
    if path.exists():
        gguf_file = path if path.suffix == ".gguf" and path.is_file() else _lone_gguf(path)
        if gguf_file is not None:
            return _gguf_report(gguf_file, ctx, batch)
        return _safetensors_report(_local_checkpoint(path), ctx, batch)
    if is_hub_id(target):
        return _safetensors_report(_hub_checkpoint(target, revision, token), ctx, batch)
    raise FormatError(f"{target}: no such file or folder (nor a Hub id like org/name)")


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


def _local_checkpoint(path: Path) -> _Checkpoint:
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
    prov = _provenance(metadata) or (_read_json(folder / "qtool.json") if (folder / "qtool.json").is_file() else None)
    return _Checkpoint(str(path), files, tensors, metadata, config, prov, _read_local_ints)


def _lone_gguf(path: Path) -> Path | None:
    """A folder whose only weights are one GGUF file stands for that file."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def _read_local_ints(t: StoredTensor) -> list[int]:
    import torch

    try:
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            raw = f.read(t.nbytes)
    except OSError as e:
        raise FormatError(f"{t.file}: cannot read: {e.strerror}") from None
    if len(raw) != t.nbytes:
        raise FormatError(f"{t.file}: truncated: tensor {t.name!r} runs past the end of the file")
    return torch.frombuffer(bytearray(raw), dtype=ST_DTYPES[t.dtype][0]).tolist() if raw else []


def _provenance(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get("qtool")
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


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


def _hub_checkpoint(repo_id: str, revision: str | None, token: str | None) -> _Checkpoint:
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
    return _Checkpoint(repo_id, files, tensors, metadata, config, _provenance(metadata), None)


def _cached_checkpoint(repo_id: str, revision: str | None) -> _Checkpoint:
    """Offline: a snapshot that an earlier `qtool quantize` (or any download) left in the cache."""
    from huggingface_hub import snapshot_download

    from qtool.model.resolve import HUB_PATTERNS

    with _hub_errors(repo_id):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
    ck = _local_checkpoint(Path(folder))
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


def _safetensors_report(ck: _Checkpoint, ctx: int, batch: int) -> InspectReport:
    config = ck.config or {}
    qconfig = config.get("quantization_config") or {}
    quant_method = qconfig.get("quant_method")
    is_ct = quant_method == "compressed-tensors"
    tensors = _ct_rows(ck.tensors, qconfig, ck.read_ints) if is_ct else [_plain_row(t) for t in ck.tensors]
    notes = []
    if ck.config is None:
        notes.append("no config.json: KV cache size unknown")
    if quant_method and not is_ct:
        notes.append(f"quant_method {quant_method!r}: tensors listed as stored, parameter counts not decoded")
    dtype = _dominant_dtype(ck.tensors)
    if is_ct:
        fmt, detail = "compressed-tensors", qconfig.get("format")
    elif quant_method:
        fmt, detail = str(quant_method), None
    else:
        fmt, detail = "safetensors", dtype
    method = _method(ck.provenance, quantized=bool(quant_method), fallback=str(quant_method) if quant_method and not is_ct else "unknown")
    return InspectReport(ck.source, fmt, detail, method, ck.files, tensors, ctx, batch,
                         kv_cache_from_config(config, ctx, batch), ck.provenance, notes)


def _method(prov: dict | None, quantized: bool, fallback: str) -> str:
    recipe = (prov or {}).get("recipe")
    if isinstance(recipe, dict) and recipe.get("method"):
        return str(recipe["method"])
    return fallback if quantized else "none"


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
    word_bits = int(ST_DTYPES[packed.dtype][1] * 8)
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


# -- KV cache ------------------------------------------------------------------------------------


def _first(cfg: dict, *keys: str):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def kv_cache_from_config(config: dict, ctx: int, batch: int) -> KVCache | None:
    """KV cache of a Hugging Face config: layers × kv_heads × 2 × head_dim per token (16-bit).
    `head_dim` where the config gives it, else hidden_size / heads; no `num_key_value_heads` means
    multi-head attention (kv heads = attention heads). Multimodal configs: their `text_config`."""
    cfg = config
    if _first(cfg, "num_hidden_layers", "n_layer", "num_layers") is None and isinstance(config.get("text_config"), dict):
        cfg = config["text_config"]
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if not layers or not heads:
        return None
    kv_heads = 1 if cfg.get("multi_query") else (_first(cfg, "num_key_value_heads", "num_kv_heads") or heads)
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return KVCache(int(layers), int(kv_heads), int(head_dim), int(head_dim), ctx, batch)


# -- GGUF ------------------------------------------------------------------------------------------


def _gguf_report(path: Path, ctx: int, batch: int) -> InspectReport:
    import gguf


    reader = open_gguf(path)
    rows = [_gguf_row(t) for t in reader.tensors]
    arch = read_field(reader, gguf.Keys.General.ARCHITECTURE, path)
    file_type = _gguf_file_type(reader, rows, path)
    prov = _gguf_provenance(reader, path)
    quantized = any(r.quantized for r in rows)
    method = _method(prov, quantized, file_type or "unknown") if prov else (file_type or "none")
    counts = Counter(r.type for r in rows)
    notes = [f"tensor types: {', '.join(f'{t} ×{n}' for t, n in counts.most_common())}"]
    kv = _gguf_kv_cache(reader, arch, ctx, batch, path) if isinstance(arch, str) else None
    if kv is None:
        notes.append("KV cache size unknown: GGUF metadata lacks the attention keys")
    return InspectReport(str(path), "gguf", file_type, method, {path.name: path.stat().st_size}, rows,
                         ctx, batch, kv, prov, notes, gguf_summary(reader, arch if isinstance(arch, str) else None))


def gguf_summary(reader, arch: str | None) -> dict:
    """The metadata a user checks first: model hyper-parameters and what the tokenizer is."""
    fields = reader.fields

    def get(key: str):
        f = fields.get(key)
        if f is None or not f.types:
            return None
        try:
            return f.contents()
        except Exception:  # a value gguf-py cannot decode: leave it out of a summary
            return None

    def count(key: str) -> int | None:
        f = fields.get(key)
        return len(f.data) if f is not None else None

    out = {
        "architecture": arch,
        "name": get("general.name"),
        "quantization_version": get("general.quantization_version"),
        "file_type": get("general.file_type"),
    }
    if arch:
        for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv", "rope.freq_base", "expert_count"):
            out[k] = get(f"{arch}.{k}")
    template = get("tokenizer.chat_template")
    out["tokenizer"] = {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "vocab_size": count("tokenizer.ggml.tokens"),
        "merges": count("tokenizer.ggml.merges"),
        "scores": count("tokenizer.ggml.scores"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "chat_template": f"{len(template)} characters" if isinstance(template, str) else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _gguf_row(t) -> TensorReport:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGML lists the fastest axis first
    return TensorReport(t.name, layer_kind(t.name), t.tensor_type.name, shape, int(t.n_elements),
                        int(t.n_bytes), quantized=block > 1)


def _gguf_file_type(reader, rows: list[TensorReport], path: Path) -> str | None:
    """`general.file_type` by its llama.cpp name (MOSTLY_Q8_0 -> Q8_0); without it, the type that
    holds the most parameters."""
    import gguf

    ft = read_field(reader, gguf.Keys.General.FILE_TYPE, path)
    if isinstance(ft, int):
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_params: Counter[str] = Counter()
    for r in rows:
        by_params[r.type] += r.params
    return by_params.most_common(1)[0][0] if by_params else None


def _gguf_provenance(reader, path: Path) -> dict | None:
    for key in reader.fields:
        if key.startswith("qtool"):
            v = read_field(reader, key, path)
            if isinstance(v, str):
                prov = _provenance({"qtool": v})
                if prov:
                    return prov
    return None


def _gguf_kv_cache(reader, arch: str, ctx: int, batch: int, path: Path) -> KVCache | None:
    import gguf

    keys = gguf.Keys

    def get(key: str):
        return read_field(reader, key.format(arch=arch), path)

    layers, heads, hidden = get(keys.LLM.BLOCK_COUNT), get(keys.Attention.HEAD_COUNT), get(keys.LLM.EMBEDDING_LENGTH)
    kv_heads = get(keys.Attention.HEAD_COUNT_KV)
    if not isinstance(layers, int) or heads is None:
        return None
    if kv_heads is None:
        kv_heads = heads
    head0 = max(heads) if isinstance(heads, list) else heads
    key_len = get(keys.Attention.KEY_LENGTH) or (hidden // head0 if isinstance(hidden, int) and head0 else None)
    value_len = get(keys.Attention.VALUE_LENGTH) or key_len
    if not key_len:
        return None
    if isinstance(kv_heads, list):
        kv_heads = [int(h) for h in kv_heads]
    return KVCache(layers, kv_heads, int(key_len), int(value_len), ctx, batch)


# -- calibration files: qtool statistics and llama.cpp importance matrices ----------------------------


def calibration_file_summary(target: str) -> dict | None:
    """What a `qtool calibrate` statistics file or a llama.cpp imatrix holds; None for anything else
    (a checkpoint), so that `inspect` reports those as usual."""
    from qtool.calib.stats import FORMAT_TAG, CalibStats
    from qtool.model.safetensors_header import read_header

    path = Path(target).expanduser()
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        if read_header(path).metadata.get("format") != FORMAT_TAG:
            return None
        s = CalibStats(path, flag="inspect")
        c = s.calibration
        return {"kind": "qtool calibration statistics", "file": str(path), "bytes": path.stat().st_size,
                "model": s.model, "linears": len(s.modules), "distinct_inputs": len({e.owner for e in s.modules.values()}),
                "hessians": s.has_hessians, "calibration": {k: c.get(k) for k in ("spec", "samples", "seq_len", "seed", "tokens")}}
    if path.suffix in (".gguf", ".dat"):
        from qtool.formats.gguf.imatrix import read_imatrix

        if path.suffix == ".gguf":
            from qtool.model.gguf_source import open_gguf, read_field

            if read_field(open_gguf(path), "general.type", path) != "imatrix":
                return None
        imx = read_imatrix(path)
        return {"kind": "llama.cpp importance matrix" + (" (legacy .dat layout)" if imx.legacy else " (GGUF layout)"),
                "file": str(path), "bytes": path.stat().st_size, "entries": len(imx.entries),
                "chunks": imx.chunk_count, "chunk_size": imx.chunk_size or None, "datasets": imx.datasets}
    return None
