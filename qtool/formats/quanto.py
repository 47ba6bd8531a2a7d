"""optimum-quanto's serialization: what `QuantizedModelForCausalLM.from_pretrained(folder)`
(optimum-quanto 0.2.7) loads. transformers' own `save_pretrained` refuses quanto models, and stock
`from_pretrained` reloads this folder with random weights (only a warning): use quanto's class.

  config.json         the model's config (no quantization_config)
  quanto_qmap.json    {module: {"weights": "qint4" | "qint2" | "qint8" | "qfloat8_e4m3fn", "activations": "none"}}
  model.safetensors   per quantized Linear `m`:
    qint4 / qint2:  m.weight._data._data  uint8 [ceil(rows / per), g]: unsigned codes U of the
                    weight viewed as [rows = out*in/g, g], row slices packed LOW bits first
                    (core/rowpack.py); m.weight._scale, m.weight._shift [rows, 1];
                    W = U * scale - shift (float shift), or (U - shift) * scale (int8 shift)
    qint8:          m.weight._data int8 [out, in], m.weight._scale [out, 1]; W = data * scale
    qfloat8:        m.weight._data float8_e4m3fn [out, in], m.weight._scale [out, 1]
    m.input_scale, m.output_scale  scalar ones (no activation quantization), m.bias unchanged

quanto stores no group size: each QLinear derives it from its input width (128; else 96 or 64
where they divide it; else, or for widths <= 128, one group per row), so the writer uses that
rule for every layer (`-g 128`, the rule's first choice, is what it accepts). int8 and float8 are
symmetric per output channel, on quanto's grid (max|w| / 127, / 448) with -m rtn. Integer zero points go in as an int8 shift (exact); HQQ's float zero
points, and every int4 bf16 group-128 layer (quanto moves those to its TinyGemm kernel, which
asserts a float shift), as the float shift z * scale in the scale's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight, dequantized_state
from qtool.core.rowpack import pack_rows, unpack_rows
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, GroupChoice, write_folder_files
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource
from qtool.qtypes import get_qtype

WEIGHTS_FILE = "model.safetensors"
QMAP_FILE = "quanto_qmap.json"
QUANTO_TYPES = {"int4": "qint4", "int2": "qint2", "int8": "qint8", "fp8_e4m3": "qfloat8_e4m3fn"}


def quanto_group_size(in_features: int) -> int | None:
    """The group size optimum-quanto's QModuleMixin picks for a qint4/qint2 weight (None: per row)."""
    g = 128
    if in_features <= g:
        return None
    while in_features % g and g > 32:
        g -= 32
    return g if in_features % g == 0 else None


def tinygemm_layout(bits: int, scale_dtype: torch.dtype, group_size: int) -> bool:
    """quanto re-packs these for its TinyGemm kernel on CPU, which takes only a float shift."""
    return bits == 4 and scale_dtype == torch.bfloat16 and group_size == 128


def pack_quanto(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> the tensors under `prefix.weight.` (suffix -> tensor)."""
    out_f, in_f = qw.shape
    scale = qw.scale.cpu()
    if qw.qtype.bits == 8:  # qint8 / qfloat8: symmetric, per output channel
        return {"_data": qw.codes.cpu().contiguous(), "_scale": scale.reshape(out_f, 1).contiguous()}
    bits = qw.qtype.bits
    offset = 2 ** (bits - 1)
    g = qw.group_size if qw.strategy == "group" else in_f
    u = (qw.codes.cpu().to(torch.int16) + offset).reshape(-1, g)
    zero = torch.zeros(u.shape[0], 1) if qw.zero_point is None else qw.zero_point.cpu().to(torch.float32).reshape(-1, 1)
    if qw.float_zeros or tinygemm_layout(bits, scale.dtype, g):
        shift = ((zero + offset) * scale.reshape(-1, 1).to(torch.float32)).to(scale.dtype)
    else:
        shift = (zero + offset).to(torch.int8)
    return {"_data._data": pack_rows(u, bits, high_first=False), "_scale": scale.reshape(-1, 1).contiguous(), "_shift": shift}


def unpack_quanto(parts: dict[str, torch.Tensor], qtype_name: str, shape: tuple[int, int], where: str) -> QuantizedWeight:
    """The tensors under `prefix.weight.` -> QuantizedWeight (qtool's signed convention)."""
    out_f, in_f = shape
    if qtype_name in ("qint8", "qfloat8_e4m3fn", "qfloat8"):
        qt = get_qtype("int8" if qtype_name == "qint8" else "fp8_e4m3")
        return QuantizedWeight(qt, parts["_data"].reshape(out_f, in_f), parts["_scale"].reshape(out_f, 1), None, "channel")
    if qtype_name not in ("qint4", "qint2"):
        raise FormatError(f"{where}: quanto weight type {qtype_name!r} is not read (qint2/4/8, qfloat8_e4m3fn)")
    bits = int(qtype_name[4:])
    g = quanto_group_size(in_f) or in_f
    rows = out_f * in_f // g
    u = unpack_rows(parts["_data._data"], bits, rows, high_first=False).reshape(out_f, in_f)
    offset = 2 ** (bits - 1)
    scale = parts["_scale"].reshape(out_f, -1)
    shift = parts["_shift"].reshape(out_f, -1)
    if shift.is_floating_point():
        zero = shift.to(torch.float32) / scale.to(torch.float32) - offset  # W = U*s - shift = (U - shift/s) * s
    else:
        zero = (shift.to(torch.int16) - offset).to(torch.int8)
    strategy = "group" if g < in_f else "channel"
    return QuantizedWeight(get_qtype(f"int{bits}"), (u - offset).to(torch.int8), scale, zero, strategy,
                           g if strategy == "group" else None)


@FORMATS.register("quanto", aliases=("optimum-quanto",))
class QuantoWriter(FormatWriter):
    """optimum-quanto folder: quanto_qmap.json + model.safetensors (+ config, tokenizer)."""

    float_zero_points = True  # the float shift holds them

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        if recipe.qtype not in QUANTO_TYPES:
            raise UnsupportedError(f"--format quanto holds int2, int4, int8 and fp8 (qint2/qint4/qint8/qfloat8), not {recipe.qtype}")
        bits = recipe.weight_type.bits
        if bits == 8 and recipe.strategy != "channel":
            raise UnsupportedError(f"--format quanto: {recipe.qtype} is per output channel (quanto's qint8/qfloat8); use -g channel")
        if bits == 8 and not recipe.symmetric:
            raise UnsupportedError(f"--format quanto: qint8 has no zero point; drop --asym (or use -b 4 / -b 2){_hqq_hint(recipe)}")
        if bits < 8 and (recipe.strategy != "group" or recipe.group_size != 128):
            raise UnsupportedError(
                f"--format quanto: {recipe.qtype} takes -g 128 (quanto derives each layer's group from its width: 128, "
                "else 96 or 64 where they divide it, else one per row)")

    def choose_groups(self, widths: dict[str, int], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        if recipe.weight_type.bits == 8:
            return {m: GroupChoice("channel", None) for m in widths}
        out = {}
        for m, w in widths.items():
            g = quanto_group_size(w)
            note = None if g == 128 else f"{'group ' + str(g) if g else 'per channel'}: quanto's group for width {w}"
            out[m] = GroupChoice("group", g, note) if g else GroupChoice("channel", None, note)
        return out

    def spec_options(self, recipe: QuantRecipe) -> dict:
        # qint8 / qfloat8: RTN with quanto's own arithmetic (s = max|w| / 127 or / 448 in the weight's
        # dtype; core/peer_rtn.py), so the codes equal what quanto's quantize makes of the weight
        return {"rounding": "quanto"} if get_qtype(recipe.qtype).bits == 8 else {}

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})
        self.qmap: dict[str, dict[str, str]] = {}
        self.scale_dtype: torch.dtype | None = None

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        module = name[: -len(".weight")]
        qname = QUANTO_TYPES.get(qw.qtype.name)
        if qname is None:
            raise UnsupportedError(f"{module}: --format quanto cannot hold {qw.qtype.name}")
        expected = quanto_group_size(qw.shape[1]) if qw.qtype.bits < 8 else None
        if (qw.group_size if qw.strategy == "group" else None) != expected or qw.g_idx is not None:
            raise UnsupportedError(f"{module}: quanto reads {qname} width {qw.shape[1]} as "
                                   f"{'group ' + str(expected) if expected else 'one group per row'}; this layer is {qw.strategy} {qw.group_size}")
        if qw.qtype.bits == 8 and qw.zero_point is not None:
            raise UnsupportedError(f"{module}: quanto's {qname} has no zero point")
        for suffix, t in pack_quanto(qw).items():
            self.st.add(f"{module}.weight.{suffix}", t)
        one = torch.ones((), dtype=qw.scale.dtype)
        self.st.add(f"{module}.input_scale", one)
        self.st.add(f"{module}.output_scale", one)
        self.qmap[module] = {"weights": qname, "activations": "none"}

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        (self.out / QMAP_FILE).write_text(json.dumps(self.qmap, indent=4) + "\n")
        write_folder_files(self.out, self.source, config, provenance)

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()


def _hqq_hint(recipe: QuantRecipe) -> str:
    return " (-m hqq always has zero points)" if recipe.method == "hqq" else ""


# -- reading back ------------------------------------------------------------------------------
def is_quanto_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / QMAP_FILE).is_file()


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of every Linear, from a model built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # type: ignore[misc]


def read_quantized(folder: Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    qmap = json.loads((folder / QMAP_FILE).read_text())
    shapes = linear_shapes(json.loads((folder / "config.json").read_text()))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                module, sep, suffix = name.partition(".weight.")
                if sep and module in qmap:
                    parts.setdefault(module, {})[suffix] = h.get_tensor(name)
                elif name.rpartition(".")[0] in qmap and name.rpartition(".")[2] in ("input_scale", "output_scale"):
                    continue
                else:
                    rest[name] = h.get_tensor(name)
    qws = {}
    for module, entry in qmap.items():
        if entry.get("activations", "none") != "none":
            raise FormatError(f"{folder}: {module} quantizes activations ({entry['activations']}); qtool reads weight-only quanto")
        if module not in parts:
            raise FormatError(f"{folder / WEIGHTS_FILE}: no quantized tensors for {module}")
        qws[module] = unpack_quanto(parts[module], entry["weights"], shapes[module], f"{folder}: {module}")
    return qws, rest


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dequantized_state(*read_quantized(folder), dtype)
