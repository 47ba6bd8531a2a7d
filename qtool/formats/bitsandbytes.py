"""bitsandbytes checkpoints (`quant_method: bitsandbytes`), as transformers + bitsandbytes save
them and load them (bitsandbytes >= 0.48 has a CPU backend).

4-bit (NF4 / FP4), per quantized Linear `prefix`:
  `prefix.weight`            uint8 [out*in/2, 1]  two codes per byte, the first in the HIGH nibble,
                                                  codes of the row-major flattened weight
  `prefix.weight.absmax`     float32 [out*in/B]   per block of B = blocksize consecutive values;
                                                  with double quantization: uint8 codes of
                                                  (absmax - offset) in the 8-bit dynamic map, and
  `prefix.weight.nested_absmax`    float32 [ceil(n/256)]
  `prefix.weight.nested_quant_map` float32 [256]  the dynamic map
  `prefix.weight.quant_map`  float32 [16]         the NF4 / FP4 levels
  `prefix.weight.quant_state.bitsandbytes__nf4`   uint8: JSON {quant_type, blocksize, dtype, shape
                                                  [, nested_blocksize, nested_dtype, nested_offset]}
  W = quant_map[code] * absmax[block].
LLM.int8: `prefix.weight` int8 [out, in], `prefix.SCB` float32 [out], `prefix.weight_format` uint8
0 ("row"); bitsandbytes computes W = weight * SCB / 127. qtool's int8 grid is compressed-tensors'
(s = max|w| / 127.5, codes in [-128, 127]), stored as SCB = 127 s: the same weights, one code more.

Linear layers left in full precision (lm_head always) are listed in `llm_int8_skip_modules`, which
both the 4- and 8-bit loaders read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import NestedScale, QuantizedWeight
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import GroupChoice
from qtool.formats.hf_quantized import HFQuantizedWriter, group_modules, load_folder, register_reader
from qtool.qtypes import get_qtype

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocksizes
STATE_PREFIX = "quant_state.bitsandbytes__"
SUFFIXES_4BIT = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                 "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
SUFFIXES_8BIT = ("weight", "SCB", "weight_format")


def pack_4bit(qw: QuantizedWeight, dtype_name: str) -> dict[str, torch.Tensor]:
    """An NF4/FP4 QuantizedWeight -> its bitsandbytes tensors (suffix -> tensor)."""
    out_f, in_f = qw.shape
    c = qw.codes.reshape(-1).to(torch.uint8).cpu()
    state = {"quant_type": qw.qtype.name, "blocksize": qw.group_size, "dtype": dtype_name, "shape": [out_f, in_f]}
    t = {"weight": ((c[::2] << 4) | c[1::2]).unsqueeze(1), "weight.quant_map": qw.qtype.table()}
    if qw.nested is None:
        t["weight.absmax"] = qw.scale.reshape(-1).to(torch.float32).cpu().contiguous()
    else:
        n = qw.nested
        t["weight.absmax"] = n.codes.cpu()
        t["weight.nested_absmax"] = n.absmax.cpu()
        t["weight.nested_quant_map"] = n.table.cpu()
        state.update(nested_blocksize=n.block, nested_dtype="float32", nested_offset=n.offset)
    t[f"weight.{STATE_PREFIX}{qw.qtype.name}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return t


def unpack_4bit(t: dict[str, torch.Tensor], where: str) -> QuantizedWeight:
    key = next((k for k in t if k.startswith("weight." + STATE_PREFIX)), None)
    if key is None:
        raise FormatError(f"{where}: bitsandbytes 4-bit module without a quant_state")
    state = json.loads(bytes(t[key].tolist()).decode())
    qt = get_qtype(state["quant_type"])
    out_f, in_f = state["shape"]
    packed = t["weight"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: out_f * in_f].reshape(out_f, in_f)
    g = int(state["blocksize"])
    if in_f % g:
        raise FormatError(f"{where}: blocks of {g} that straddle rows (width {in_f}) are not read by qtool")
    if "weight.nested_absmax" in t:
        nested = NestedScale(t["weight.absmax"], t["weight.nested_absmax"].float(), t["weight.nested_quant_map"].float(),
                             float(state["nested_offset"]), int(state["nested_blocksize"]))
        scale = nested.dequantize().reshape(out_f, in_f // g)
    else:
        nested, scale = None, t["weight.absmax"].float().reshape(out_f, in_f // g)
    return QuantizedWeight(qt, codes.contiguous(), scale, None, "group", g, nested=nested)


def pack_int8(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {"weight": qw.codes.cpu().contiguous(), "SCB": (qw.scale.reshape(-1).float() * 127).cpu(),
            "weight_format": torch.tensor(0, dtype=torch.uint8)}


def unpack_int8(t: dict[str, torch.Tensor]) -> QuantizedWeight:
    return QuantizedWeight(get_qtype("int8"), t["weight"], (t["SCB"].float() / 127).unsqueeze(1), None, "channel")


@FORMATS.register("bitsandbytes", aliases=("bnb",))
class BitsAndBytesWriter(HFQuantizedWriter):
    """transformers + bitsandbytes: NF4 / FP4 (blockwise absmax, optional double quantization) and LLM.int8."""

    qtype_kinds = ("int", "lut")
    default_qtype = "nf4"

    def __init__(self, double_quant: bool | None = None, **options: object) -> None:
        super().__init__(**options)
        self.double_quant = bool(double_quant)

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        qt = recipe.weight_type
        if qt.kind == "int" and qt.bits != 8:
            raise UnsupportedError(f"--format bitsandbytes holds nf4, fp4 (4-bit tables) or int8 (LLM.int8), not {qt.name}")
        if qt.kind == "int" and (recipe.strategy != "channel" or not recipe.symmetric):
            raise UnsupportedError("--format bitsandbytes int8 (LLM.int8) is symmetric per output channel: use -g channel, no --asym")
        if qt.kind == "int" and self.double_quant:
            raise UnsupportedError("--double-quant: applies to nf4 / fp4 only (LLM.int8 stores float32 row scales)")
        if qt.kind == "lut" and recipe.group_size not in BLOCK_SIZES:
            raise UnsupportedError(f"--group-size {recipe.group_size}: bitsandbytes 4-bit block sizes are {', '.join(map(str, BLOCK_SIZES))}")

    def choose_groups(self, widths: dict[str, int], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        if recipe.weight_type.kind == "lut":  # blocks run along rows: a row must hold whole blocks
            for m, w in widths.items():
                if w % recipe.group_size:  # type: ignore[operator]
                    fits = [b for b in BLOCK_SIZES if w % b == 0]
                    raise UnsupportedError(f"layer {m}: width {w} is not a multiple of the block size {recipe.group_size}"
                                           + (f"; blocks that fit: {', '.join(map(str, fits))}" if fits else "; leave it out with --ignore"))
        return super().choose_groups(widths, recipe)

    def spec_options(self, recipe: QuantRecipe) -> dict:
        # double quantization: the nested codes of bitsandbytes' own CPU kernel (core/lut.py)
        return {"scale_dtype": torch.float32, "double_quant": self.double_quant, "rounding": "bitsandbytes"}

    def begin(self, out: Path, source, recipe: QuantRecipe | None) -> None:
        super().begin(out, source, recipe)
        self.qtype = recipe.weight_type if recipe else get_qtype("nf4")

    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        t = pack_4bit(qw, self.dtype_name) if qw.qtype.kind == "lut" else pack_int8(qw)
        return {f"{prefix}.{k}": v for k, v in t.items()}

    def quantization_config(self) -> dict:
        four = self.qtype.kind == "lut"
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": four, "load_in_8bit": not four, "_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_quant_type": self.qtype.name if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_skip_modules": self.not_converted(),
        }


def read_quantized(folder: Path, config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A bitsandbytes folder -> ({module: QuantizedWeight}, {name: other tensor})."""
    tensors, _ = load_folder(folder)
    four = bool(config["quantization_config"].get("load_in_4bit"))
    modules, rest = group_modules(tensors, SUFFIXES_4BIT if four else SUFFIXES_8BIT)
    qws: dict[str, QuantizedWeight] = {}
    for prefix, t in modules.items():
        if four and any(k.startswith("weight.quant_state") for k in t):
            qws[prefix] = unpack_4bit(t, prefix)
        elif not four and "SCB" in t:
            qws[prefix] = unpack_int8(t)
        else:  # a plain Linear (lm_head, skipped layers): only its weight matched a suffix
            rest.update({f"{prefix}.{k}": v for k, v in t.items()})
    return qws, rest


register_reader("bitsandbytes", read_quantized)
