"""HQQ's own checkpoint: what hqq 0.2.8's `AutoHQQHFModel.from_quantized(folder)` loads.

A folder with `config.json` (the model's config, `architectures` naming the CausalLM class) and
`qmodel.pt`: one `torch.save`d dict {module name: {key: tensor}}, read by hqq with
`torch.load(weights_only=True)`. Modules without `W_q` (embeddings, norms, unquantized linears)
hold their plain tensors (`weight`, `bias`); a quantized Linear holds HQQLinear's state dict in
its safetensors-style encoding (every entry a tensor, `encoded_state_dict` = 1):

  W_q     [rows / per, g] uint8 (int32 for 3-bit) unsigned codes of the weight viewed as
          [rows = out*in/g, g] (axis=1: groups run along the input dimension), cut into `per`
          row slices packed into one word, slice 0 in the HIGH bits (core/rowpack.py); 8/6/5-bit
          one code per byte, 3-bit ten per int32 with the rows padded to a multiple of 10
  scale   [rows, 1]   float, W = (W_q - zero) * scale
  zero    [rows, 1]   float zero point (HQQ's are not integers), in the scale's dtype (as hqq saves)
  nbits, group_size, axis (int32 scalars), shape (int64 [2]), packing and unpack_view_dtype
  (strings as uint8 codes), view_as_float, quant_scale, quant_zero, channel_wise, optimize,
  round_zero, offload_meta, stores_quant_config (uint8 flags), bias if any.

No `quantization_config` goes into config.json: transformers 5.23's HqqConfig raises on it, and
stock `from_pretrained` finds no weights file here (it fails loudly, rather than loading
random weights as it does for hqq's own safetensors dumps). Any method's integer weights fit:
qtool's signed codes and zero points shift by +2^(b-1); a symmetric layer gets zero 2^(b-1).
The dict is held in memory until the end (hqq's file is a single pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight, dequantized_state
from qtool.core.rowpack import pack_rows, unpack_rows
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, write_folder_files
from qtool.model.source import CheckpointSource
from qtool.qtypes import get_qtype

from qtool.model.safetensors_header import HQQ_WEIGHTS_FILE as WEIGHTS_FILE, is_hqq_folder  # noqa: E402,F401
PACKING = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}
ROWS_PER_WORD = {4: 2, 2: 4, 1: 8}  # hqq's 4/2/1-bit packers need the rows to split evenly


def _flag(v: bool) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.uint8)


def _text(s: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in s], dtype=torch.uint8)


def pack_hqq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> HQQLinear's encoded state dict (without bias)."""
    bits = qw.qtype.bits
    out_f, in_f = qw.shape
    g = qw.group_size if qw.strategy == "group" else in_f
    offset = 2 ** (bits - 1)
    u = (qw.codes.cpu().to(torch.int16) + offset).reshape(-1, g)  # [rows, g] unsigned
    packing = PACKING[bits]
    if bits in (8, 6, 5):
        w_q = u.to(torch.uint8)
    else:
        w_q = pack_rows(u, bits, high_first=True, word=torch.int32 if bits == 3 else torch.uint8)
    scale = qw.scale.cpu().reshape(-1, 1)
    if qw.zero_point is None:
        zero = torch.full_like(scale, float(offset))
    else:
        # in the scale's dtype, as hqq's own HQQLinear keeps (and saves) both: a bf16 file holds the
        # zeros hqq itself makes, and its loader casts them to the compute dtype anyway; integer
        # zeros (< 256) are exact in bf16
        zero = (qw.zero_point.cpu().to(torch.float32) + offset).to(scale.dtype).reshape(-1, 1)
    return {
        "W_q": w_q.contiguous(), "scale": scale.contiguous(), "zero": zero.contiguous(),
        "nbits": torch.tensor(bits, dtype=torch.int32), "group_size": torch.tensor(g, dtype=torch.int32),
        "axis": torch.tensor(1, dtype=torch.int32), "shape": torch.tensor([out_f, in_f]),
        "packing": _text(packing), "unpack_view_dtype": _text(str(w_q.dtype)),
        "view_as_float": _flag(False), "quant_scale": _flag(False), "quant_zero": _flag(False),
        "channel_wise": _flag(True), "optimize": _flag(True), "round_zero": _flag(False),
        "offload_meta": _flag(False), "encoded_state_dict": _flag(True), "stores_quant_config": _flag(True),
    }


def _value(v):
    """An hqq state-dict entry, encoded (tensor) or raw (hqq's own save_quantized), -> Python value."""
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.uint8 and v.dim() == 1:
            return "".join(chr(int(c)) for c in v)
        return v.tolist()
    return str(v) if isinstance(v, torch.dtype) else (list(v) if isinstance(v, torch.Size) else v)


def unpack_hqq(state: dict, where: str) -> QuantizedWeight:
    """HQQLinear's state dict (encoded or raw) -> QuantizedWeight with float zero points."""
    bits, g, axis = int(_value(state["nbits"])), int(_value(state["group_size"])), int(_value(state["axis"]))
    out_f, in_f = (int(x) for x in _value(state["shape"]))
    if axis != 1 or bits not in PACKING or in_f % g:
        raise FormatError(f"{where}: HQQ layer with axis={axis}, nbits={bits}, group_size={g} (qtool reads axis=1, "
                          f"groups dividing the input width, {', '.join(map(str, sorted(PACKING)))} bits)")
    if _value(state.get("quant_scale", False)) or _value(state.get("quant_zero", False)):
        raise FormatError(f"{where}: quantized HQQ scales/zero points (deprecated in hqq) are not read")
    rows = out_f * in_f // g
    w_q = state["W_q"]
    u = w_q.to(torch.int32) if bits in (8, 6, 5) else unpack_rows(w_q.contiguous(), bits, rows, high_first=True)
    offset = 2 ** (bits - 1)
    codes = (u.reshape(out_f, in_f) - offset).to(torch.int8)
    scale = state["scale"].reshape(out_f, -1)
    zero = state["zero"].to(torch.float32).reshape(out_f, -1) - offset
    strategy = "group" if g < in_f else "channel"
    qt = get_qtype(f"int{bits}")
    return QuantizedWeight(qt, codes, scale, zero, strategy, g if strategy == "group" else None)


@FORMATS.register("hqq")
class HQQWriter(FormatWriter):
    """hqq's folder: config.json + qmodel.pt (HQQLinear state dicts)."""

    qtype_kinds = ("int",)
    float_zero_points = True

    def check_recipe(self, recipe: QuantRecipe) -> None:
        bits = recipe.weight_type.bits
        if not recipe.weight_type.is_int or bits not in PACKING:
            raise UnsupportedError(f"--format hqq holds {', '.join(map(str, sorted(PACKING)))}-bit integers, not {recipe.qtype}")

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        self.planned = set(quantized)

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        self.names = [t.name for t in source.tensors()]
        if recipe is None:
            return
        per = ROWS_PER_WORD.get(recipe.weight_type.bits)
        shapes = {t.name[: -len(".weight")]: t.shape for t in source.tensors() if t.name.endswith(".weight")}
        for m in sorted(getattr(self, "planned", set())):
            out_f, in_f = shapes[m]
            g = recipe.group_size if recipe.strategy == "group" and in_f % recipe.group_size == 0 else None  # type: ignore[operator]
            rows = out_f * in_f // (g or in_f)
            if per and rows % per:
                raise UnsupportedError(f"layer {m}: --format hqq at {recipe.weight_type.bits} bits packs {per} rows of groups per "
                                       f"byte; {out_f}x{in_f} in groups of {g or in_f} gives {rows} rows")

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        module = name[: -len(".weight")]
        per = ROWS_PER_WORD.get(qw.qtype.bits)
        if qw.g_idx is not None:
            raise UnsupportedError(f"{module}: an act-order group map (g_idx) cannot be stored in --format hqq")
        rows = qw.codes.numel() // (qw.group_size if qw.strategy == "group" else qw.shape[1])  # type: ignore[operator]
        if per and rows % per:
            raise UnsupportedError(f"{module}: --format hqq packs {per} rows per byte; this layer has {rows}")
        self.modules.setdefault(module, {}).update(pack_hqq(qw))

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        module, _, key = name.rpartition(".")
        self.modules.setdefault(module, {})[key] = t.detach().cpu().contiguous()

    def finish(self, config: dict, provenance: dict) -> None:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        if config.get("tie_word_embeddings") and "lm_head" not in self.modules:
            # hqq builds the model on the meta device and fills modules one by one: a tied lm_head
            # would stay empty, so it gets the embedding's tensor under its own name.
            embed = next((n for n in self.names if n.endswith("embed_tokens.weight")), None)
            if embed is None:
                raise UnsupportedError("--format hqq: tied embeddings but no `embed_tokens.weight` to give lm_head")
            self.modules["lm_head"] = {"weight": self.modules[embed[: -len(".weight")]]["weight"]}
        torch.save(self.modules, self.out / WEIGHTS_FILE)
        write_folder_files(self.out, self.source, config, provenance, hqq={"weights": WEIGHTS_FILE})


# -- reading back ------------------------------------------------------------------------------
def load_modules(folder: Path) -> dict[str, dict]:
    """qmodel.pt with torch's weights-only unpickler (tensors, numbers, strings, sizes, dtypes:
    no code runs), memory-mapped."""
    path = folder / WEIGHTS_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds; one line naming the file is what helps
        raise FormatError(f"{path}: cannot load with weights_only=True: {str(e).splitlines()[0]}") from None


def read_quantized(folder: Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """An HQQ folder -> ({module: QuantizedWeight}, {tensor name: other tensor})."""
    qws, rest = {}, {}
    for module, state in load_modules(folder).items():
        if "W_q" in state:
            qws[module] = unpack_hqq(state, f"{folder / WEIGHTS_FILE}: {module}")
            if isinstance(state.get("bias"), torch.Tensor):
                rest[f"{module}.bias"] = state["bias"]
        else:
            rest.update({f"{module}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return qws, rest


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dequantized_state(*read_quantized(folder), dtype)
