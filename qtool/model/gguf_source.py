"""Read a GGUF file as if it were a Hugging Face checkpoint.

Approach
--------
* **Parsing** is gguf-py's `GGUFReader` (memory-mapped: a tensor's bytes are touched only when
  `get_tensor` dequantizes it). The stock reader trusts the file: a length or offset that points
  past the end makes it slice a short array out of the memmap and carry on with garbage, so
  `_CheckedReader` overrides three of its internal hooks to check every read against the file
  size and to vet each tensor's type id and data extent (naming the tensor) before gguf-py touches
  the data. Magic and version are checked up front from the first 8 bytes. Anything the reader
  still raises is turned into a one-line `FormatError` naming the file.
* **Config and tokenizer** come from transformers' own GGUF support
  (`AutoConfig` / `AutoTokenizer.from_pretrained(folder, gguf_file=name)`), so the metadata
  mapping is exactly the one `transformers` uses when it loads the same file.
* **Tensor names and shapes** come from the Hugging Face model itself: we build it from that config
  on the meta device (no memory), and map each state-dict name to its GGUF name with gguf-py's
  `get_tensor_name_map(arch, n_blocks)` (the table llama.cpp's converter uses HF -> GGUF), then
  invert that. Tied parameters appear once (the tied `lm_head.weight` is not emitted); GGUF
  tensors with no HF counterpart (e.g. `rope_freqs`) are skipped and listed in `skipped`.
* **Values**: `gguf.quants.dequantize` (every GGML type gguf-py knows), reshape to the HF shape,
  undo llama.cpp's Q/K row permutation where its converter applied it, cast to the requested dtype.

Architectures whose tensors transformers has to transform beyond that (fused/split experts,
transposes, `norm - 1`...) are refused with `UnsupportedError` rather than converted wrongly.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.model.gguf_header import check_preamble
from qtool.model.source import CheckpointSource, TensorMeta

GGUF_MAGIC = b"GGUF"
# GGUF architectures whose Q/K projection rows llama.cpp's converter permutes (`LlamaModel.permute`:
# HF's rotate-half RoPE layout -> GGML's interleaved pairs) and transformers un-permutes on load.
# Mistral GGUFs also say "llama".
PERMUTED_QK_ARCHS = frozenset({"llama"})
_SUFFIXES = (".weight", ".bias")


# -- reading the container ---------------------------------------------------------------------


class _Corrupt(Exception):
    """A structural problem found while parsing; the message does not name the file yet."""


class _CheckedReader(gguf.GGUFReader):
    """`GGUFReader` that never reads past the end of the file.

    Overrides gguf-py internals (`_get`, `_get_str`, `_build_tensors`); they have been stable
    since gguf 0.6, and tests/test_gguf_source.py pins the behaviour we rely on.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        start = int(offset)
        end = start + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise _Corrupt(
                f"truncated: a {end - start}-byte read at offset {start} runs past the end of the "
                f"{self.data.size}-byte file"
            )
        return super()._get(offset, dtype, count, override_order)

    def _get_str(self, offset):  # same as gguf-py's, plus the length check
        length = self._get(offset, np.uint64)
        if int(offset) + 8 + int(length[0]) > self.data.size:
            raise _Corrupt(
                f"string at offset {int(offset)} claims {int(length[0])} bytes, more than the "
                f"{self.data.size}-byte file holds"
            )
        return length, self._get(offset + 8, np.uint8, length[0])

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _check_tensor_info(field, int(start_offs), int(self.data.size))
        super()._build_tensors(start_offs, fields)


def _check_tensor_info(field, data_start: int, file_size: int) -> None:
    """Vet one tensor-info record (`name, n_dims, dims, type, offset`) before gguf-py maps its data."""
    name = field.name
    _, _, _, dims, raw_type, rel_offset = field.parts
    type_id = int(raw_type[0])
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name!r} has unknown GGML type id {type_id}") from None
    shape = [int(d) for d in dims]
    if shape and shape[0] % block:
        raise _Corrupt(f"tensor {name!r}: row length {shape[0]} is not a multiple of the "
                       f"{qtype.name} block size {block}")
    begin = data_start + int(rel_offset[0])
    end = begin + math.prod(shape) * type_size // block
    if begin > file_size:
        raise _Corrupt(f"tensor {name!r}: data offset {begin} lies past the end of the "
                       f"{file_size}-byte file")
    if end > file_size:
        raise _Corrupt(f"tensor {name!r}: data (bytes {begin}..{end}) runs past the end of the "
                       f"{file_size}-byte file (truncated?)")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_preamble(path: Path) -> None:
    """Magic and version, from the first 8 bytes, with messages clearer than gguf-py's."""
    check_preamble(path)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open and validate a GGUF file; any structural problem becomes a `FormatError`."""
    _check_preamble(path)
    try:
        return _CheckedReader(path)
    except _Corrupt as e:
        raise FormatError(f"{path}: corrupt GGUF file: {e}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, struct.error,
            OSError) as e:
        raise FormatError(f"{path}: corrupt GGUF file: {_one_line(e)}") from e


def read_field(reader: gguf.GGUFReader, key: str, path: Path):
    """One metadata value (None when absent); an undecodable value is a FormatError naming it."""
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise FormatError(f"{path}: corrupt GGUF metadata value {key!r}: {_one_line(e)}") from e


# -- what transformers makes of it -------------------------------------------------------------


def _architecture(reader: gguf.GGUFReader, path: Path) -> tuple[str, gguf.MODEL_ARCH]:
    arch = read_field(reader, gguf.Keys.General.ARCHITECTURE, path)
    if not isinstance(arch, str):
        raise FormatError(f"{path}: GGUF metadata lacks {gguf.Keys.General.ARCHITECTURE!r}")
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return arch, enum
    raise UnsupportedError(f"{path}: GGUF architecture {arch!r} is unknown to gguf-py")


# GGUF architectures read through transformers' own GGUF loader (config, tokenizer): those whose
# tensors it maps with a rename alone (plus llama's Q/K un-permutation). The architectures of
# hf_config.READABLE are read through qtool's own plan instead (unplan.py).
VIA_TRANSFORMERS = frozenset({"llama", "qwen2", "phi3", "falcon", "stablelm", "starcoder2", "deci"})


def _check_convertible(reader: gguf.GGUFReader, arch: str, path: Path) -> None:
    """Refuse, from the header alone (no tensor read, transformers not imported), split files and
    architectures qtool cannot map back to a Hugging Face checkpoint."""
    from qtool.formats.gguf.hf_config import READABLE

    splits = read_field(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, path)
    if isinstance(splits, int) and splits > 1:
        raise UnsupportedError(f"{path}: split GGUF ({splits} shards); merge it first "
                               "(llama-gguf-split --merge)")
    if arch not in VIA_TRANSFORMERS and arch not in READABLE:
        known = ", ".join(sorted(VIA_TRANSFORMERS | set(READABLE)))
        raise UnsupportedError(f"{path}: GGUF architecture {arch!r} cannot be mapped back to a Hugging Face "
                               f"checkpoint by qtool; readable: {known}")


def _hf_config(path: Path, arch: str):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, UnicodeDecodeError) as e:  # transformers' reading of a damaged metadata section
        raise FormatError(f"{path}: corrupted GGUF metadata: {_one_line(e)}") from None
    except (ArithmeticError, StrictDataclassError) as e:  # a head count of 0, heads not dividing the width (fuzzed)
        raise FormatError(f"{path}: GGUF metadata that makes no model: {_one_line(e)}") from None
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedError(f"{path}: transformers cannot convert GGUF architecture {arch!r}: "
                               f"{_one_line(e)}") from e


def _phi3_rope(reader: gguf.GGUFReader, hf_config, path: Path) -> None:
    """transformers' GGUF loader drops phi3's LongRoPE (the rope_factors_long/short tensors and the
    original context length): put them back into the config, as Phi3Config holds them."""
    orig = read_field(reader, "phi3.rope.scaling.original_context_length", path)
    if orig is not None:
        hf_config.original_max_position_embeddings = orig
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if not factors:
        return
    if set(factors) != {"rope_factors_long.weight", "rope_factors_short.weight"} or orig is None:
        raise FormatError(f"{path}: phi3 LongRoPE needs rope_factors_long, rope_factors_short and "
                          "phi3.rope.scaling.original_context_length")
    values = {k: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1).tolist()
              for k, t in factors.items()}
    rp = dict(getattr(hf_config, "rope_parameters", None) or {})
    rp.update(rope_type="longrope", long_factor=values["rope_factors_long.weight"],
              short_factor=values["rope_factors_short.weight"], original_max_position_embeddings=orig)
    if (attn := read_field(reader, "phi3.rope.scaling.attn_factor", path)) is not None:
        rp["attention_factor"] = attn
    hf_config.rope_parameters = rp


def _hf_skeleton(hf_config, path: Path) -> torch.nn.Module:
    """The HF causal-LM built on the meta device: its state dict gives names and shapes for free."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as e:
        raise UnsupportedError(f"{path}: no causal-LM class for model_type "
                               f"{hf_config.model_type!r}: {_one_line(e)}") from e


def _config_dict(hf_config, architecture: str, dtype: torch.dtype) -> dict:
    config = hf_config.to_dict()
    for junk in ("_name_or_path", "_model_name_or_path"):  # the GGUF folder and general.name
        config.pop(junk, None)
    config["architectures"] = [architecture]
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name  # transformers >= 4.56
    config["torch_dtype"] = dtype_name  # older readers (vLLM, transformers < 4.56)
    return config


# -- the tensor plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    tensor: gguf.ReaderTensor
    shape: tuple[int, ...]  # HF shape
    qk_heads: int | None  # head count to un-permute rows with, or None


def _unique_state_dict(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, each tied parameter once (under its first name: embed_tokens, not lm_head)."""
    seen: set[int] = set()
    out: dict[str, tuple[int, ...]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[name] = tuple(value.shape)
    return out


def _lookup(name_map: gguf.TensorNameMap, hf_name: str):
    """gguf-py's HF->GGUF table, trying the name and its sub-module suffixes (as transformers does:
    some models were converted from the bare model, without the `model.` prefix)."""
    parts = hf_name.split(".")
    for i in range(len(parts) - 1):
        hit = name_map.get_type_and_name(".".join(parts[i:]), try_suffixes=_SUFFIXES)
        if hit is not None:
            return hit
    return None


def _gguf_to_hf(hf_names, arch_enum: gguf.MODEL_ARCH, n_blocks: int):
    """GGUF name -> (HF name, MODEL_TENSOR kind), from gguf-py's table used in reverse."""
    name_map = gguf.get_tensor_name_map(arch_enum, n_blocks)
    out: dict[str, tuple[str, gguf.MODEL_TENSOR]] = {}
    for hf_name in hf_names:
        hit = _lookup(name_map, hf_name)
        if hit is not None:
            out.setdefault(hit[1], (hf_name, hit[0]))
    return out


def _qk_heads(kind: gguf.MODEL_TENSOR, arch: str, hf_config) -> int | None:
    if arch not in PERMUTED_QK_ARCHS:
        return None
    n_head = hf_config.num_attention_heads
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return n_head
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return getattr(hf_config, "num_key_value_heads", None) or n_head
    return None


def _entry(tensor, hf_name: str, hf_shape, qk_heads: int | None, path: Path) -> _Entry:
    if tensor.n_elements != math.prod(hf_shape):
        raise FormatError(f"{path}: tensor {tensor.name!r} has shape "
                          f"{tuple(reversed(tensor.shape.tolist()))}, but {hf_name} needs {hf_shape}")
    if qk_heads is not None and hf_shape[0] % (2 * qk_heads):
        raise FormatError(f"{path}: tensor {tensor.name!r}: {hf_shape[0]} rows do not split into "
                          f"{qk_heads} heads of pairs")
    return _Entry(tensor, tuple(hf_shape), qk_heads)


def _plan(reader, arch: str, arch_enum, hf_config, hf_shapes: dict, path: Path):
    """HF name -> _Entry in file order, plus the GGUF tensors HF has no place for."""
    mapping = _gguf_to_hf(hf_shapes, arch_enum, hf_config.num_hidden_layers)
    plan: dict[str, _Entry] = {}
    skipped: list[str] = []
    for tensor in reader.tensors:
        hf_name, kind = mapping.get(tensor.name, (None, None))
        if hf_name is None:
            skipped.append(tensor.name)
            continue
        plan[hf_name] = _entry(tensor, hf_name, hf_shapes[hf_name],
                               _qk_heads(kind, arch, hf_config), path)
    missing = [n for n in hf_shapes if n not in plan]
    if missing:
        raise FormatError(f"{path}: GGUF lacks {len(missing)} tensor(s) the {arch} model needs: "
                          f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return plan, tuple(skipped)


def unpermute_qk_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute`. Per head, HF orders rows [x_0..x_{d/2-1}, y_0..]
    (rotate-half RoPE); llama.cpp stores them as pairs (x_0, y_0, x_1, y_1, ...). Works for the
    bias too."""
    half = t.shape[0] // n_head // 2
    return t.reshape(n_head, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


# -- the source --------------------------------------------------------------------------------


class GGUFSource(CheckpointSource):
    """A GGUF file seen as a Hugging Face checkpoint (see the module docstring)."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.dtype = dtype
        self._reader = open_gguf(self.path)
        self.arch, arch_enum = _architecture(self._reader, self.path)
        _check_convertible(self._reader, self.arch, self.path)
        self._routes = None
        if self.arch not in VIA_TRANSFORMERS:
            self._init_planned()
            return
        hf_config = _hf_config(self.path, self.arch)
        if self.arch == "phi3":
            _phi3_rope(self._reader, hf_config, self.path)
        skeleton = _hf_skeleton(hf_config, self.path)
        self._plan, self.skipped = _plan(self._reader, self.arch, arch_enum, hf_config,
                                         _unique_state_dict(skeleton), self.path)
        self.config = _config_dict(hf_config, type(skeleton).__name__, dtype)

    def _init_planned(self) -> None:
        """Config from the GGUF header (hf_config.py), tensor names from the HF model built on the
        meta device, and the writer's plan run backwards (unplan.py)."""
        from transformers import AutoConfig

        from qtool.formats.gguf import hf_config as hc
        from qtool.formats.gguf import metadata as md
        from qtool.formats.gguf import unplan

        prefix = f"{self.arch}."
        fields = {f.name: read_field(self._reader, f.name, self.path) for f in self._reader.fields.values()
                  if f.name.startswith(prefix) or f.name.endswith("_token_id")}
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in self._reader.tensors}
        cfg = hc.config_from_gguf(fields, shapes, self.arch, str(self.path))
        model_type = cfg.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **cfg)
        skeleton = _hf_skeleton(hf_config, self.path)
        names = unplan.checkpoint_names(_unique_state_dict(skeleton), fused_checkpoint=model_type == "gpt_oss")
        config = {**hf_config.to_dict(), "model_type": model_type}
        self._routes, self.skipped = unplan.plan_back(config, md.ARCHS[model_type], names, shapes, str(self.path))
        self._hf_shapes = {n: s for n, s in names.items() if n in self._routes}
        self._by_name = {t.name: t for t in self._reader.tensors}
        self._cache: dict[str, torch.Tensor] = {}
        self.config = _config_dict(hf_config, type(skeleton).__name__, self.dtype)

    def _entry_value(self, entry) -> torch.Tensor:
        """A GGUF tensor in float32, torch order; the last few are kept (a stack of experts is read
        once for all its experts)."""
        if entry.name not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            raw = self._dequantize(self._by_name[entry.name])
            self._cache[entry.name] = torch.from_numpy(raw).float().reshape(entry.shape)
        return self._cache[entry.name]

    def tensors(self) -> list[TensorMeta]:
        if self._routes is not None:
            return [TensorMeta(name, shape, self.dtype) for name, shape in self._hf_shapes.items()]
        return [TensorMeta(name, e.shape, self.dtype) for name, e in self._plan.items()]

    def get_tensor(self, name: str) -> torch.Tensor:
        if self._routes is not None:
            from qtool.formats.gguf.unplan import rebuild

            if name not in self._routes:
                raise KeyError(name)
            return rebuild(name, self._hf_shapes[name], self._routes[name], self._entry_value).to(self.dtype)
        entry = self._plan.get(name)
        if entry is None:
            raise KeyError(name)
        t = torch.from_numpy(self._dequantize(entry.tensor)).reshape(entry.shape)
        if entry.qk_heads is not None:
            t = unpermute_qk_rows(t, entry.qk_heads)
        return t.to(self.dtype)

    def _dequantize(self, tensor: gguf.ReaderTensor) -> np.ndarray:
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedError(f"{self.path}: tensor {tensor.name!r} is "
                                   f"{tensor.tensor_type.name}, which gguf-py cannot dequantize") from e
        # F32 comes back as a read-only view of the memmap: copy so callers own their tensor.
        return values if values.flags.writeable else values.copy()

    def write_aux_files(self, out_dir: Path) -> list[str]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [Path(p).name for p in self._tokenizer().save_pretrained(out_dir)
                   if Path(p).is_file()]
        self._generation_config().save_pretrained(out_dir)
        return written + ["generation_config.json"]

    def _tokenizer(self):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # AutoTokenizer first reads a transformers config from the GGUF, which it cannot for the
        # architectures read through qtool's own plan; the fast tokenizer is built from the
        # tokenizer.* keys alone
        auto = AutoTokenizer if self._routes is None else PreTrainedTokenizerFast
        try:
            return auto.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except (ValueError, KeyError, NotImplementedError) as e:
            model = read_field(self._reader, gguf.Keys.Tokenizer.MODEL, self.path)
            raise UnsupportedError(f"{self.path}: transformers cannot build a tokenizer from this "
                                   f"GGUF (tokenizer.ggml.model={model!r}): {_one_line(e)}") from e

    def _generation_config(self):
        """bos/eos/pad from the tokenizer metadata; eos also lists llama.cpp's other end-of-
        generation tokens (eot, eom), which it stops on too."""
        from transformers import GenerationConfig

        keys = gguf.Keys.Tokenizer
        ids = {k: read_field(self._reader, k, self.path)
               for k in (keys.BOS_ID, keys.EOS_ID, keys.EOT_ID, keys.EOM_ID, keys.PAD_ID)}
        eos = list(dict.fromkeys(i for k in (keys.EOS_ID, keys.EOT_ID, keys.EOM_ID)
                                 if (i := ids[k]) is not None))
        return GenerationConfig(bos_token_id=ids[keys.BOS_ID], pad_token_id=ids[keys.PAD_ID],
                                eos_token_id=eos[0] if len(eos) == 1 else (eos or None))

    def input_files(self) -> list[Path]:
        return [self.path]
