"""Two float8 layouts transformers defines, both e4m3 weights with float32 scales:

Fine-grained FP8 (`-f fp8`, `quant_method: fp8`, DeepSeek-V3's layout): per quantized Linear
  `prefix.weight`           float8_e4m3fn [out, in]
  `prefix.weight_scale_inv` float32 [out/128, in/128]   max|w| / 448 of each 128 x 128 tile
  W = weight * weight_scale_inv[row // 128, col // 128]. On a CPU transformers dequantizes while
loading (`Fp8Dequantize`), inferring the tile from weight rows // scale rows and refusing a weight
the scale grid does not divide. A grid padded to ceil(in / 128) therefore cannot be read, and
transformers' own quantizer writes such layers with a zero scale (they reload as zeros). qtool
keeps every layer whose rows or columns are not multiples of 128 in full precision, lists it in
`modules_to_not_convert` and says so in the run notes; a model where that is every layer (SmolLM2:
widths 576 and 192) is refused before anything is read.

FBGEMM FP8 (`-f fbgemm-fp8`, `quant_method: fbgemm_fp8`): `FbgemmFp8Linear` holds
  `prefix.weight` float8_e4m3fn [out, in], `prefix.weight_scale` float32 [out, 1] (max|w| / 448 per
  row, as fbgemm's quantize_fp8_per_row); activations are quantized per row at run time, bounded by
  `activation_scale_ub`. It has no CPU kernel: tests/test_otf_formats.py checks the layout against
  the module definition here and loads it where a CUDA GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import GroupChoice
from qtool.formats.hf_quantized import HFQuantizedWriter, group_modules, load_folder, register_reader
from qtool.qtypes import get_qtype

BLOCK = (128, 128)


class _Float8Writer(HFQuantizedWriter):
    qtype_kinds = ("float",)
    default_qtype = "fp8"

    def check_recipe(self, recipe: QuantRecipe) -> None:
        if recipe.weight_type.name != "fp8_e4m3":
            raise UnsupportedError(f"--format {self.registry_name} holds fp8 (e4m3) weights, not {recipe.qtype}: use --qtype fp8")
        if recipe.strategy != "channel":
            raise UnsupportedError(f"--format {self.registry_name}: {self.layout}; leave --group-size at its default (channel)")

    def spec_options(self, recipe: QuantRecipe) -> dict:
        return {"scale_dtype": torch.float32}


@FORMATS.register("fp8", aliases=("finegrained-fp8", "fine-grained-fp8"))
class FineGrainedFP8Writer(_Float8Writer):
    """transformers' fine-grained FP8: e4m3 weights with one float32 scale per 128 x 128 tile."""

    layout = "scales per 128 x 128 tile"

    def choose_layouts(self, shapes: dict[str, tuple[int, int]], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        r, c = BLOCK
        note = (f"{r} x {c} FP8 tiles do not divide its shape (transformers' FP8 loader reads whole tiles "
                "only); listed in modules_to_not_convert")
        out = {m: GroupChoice("block", None) if s[0] % r == 0 and s[1] % c == 0 else GroupChoice("keep", None, note)
               for m, s in shapes.items()}
        if shapes and all(ch.strategy == "keep" for ch in out.values()):
            dims = sorted({d for s in shapes.values() for d in s if d % 128})
            raise UnsupportedError(f"--format fp8: no layer of this model has rows and columns that are multiples of "
                                   f"{r} x {c} (its widths {', '.join(map(str, dims))} are not): every layer would stay "
                                   "in full precision; use --format compressed-tensors --qtype fp8 or --format fbgemm-fp8")
        return out

    def spec_options(self, recipe: QuantRecipe) -> dict:
        return {"scale_dtype": torch.float32, "block": BLOCK}

    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": qw.codes.cpu().contiguous(), f"{prefix}.weight_scale_inv": qw.scale.float().cpu().contiguous()}

    def quantization_config(self) -> dict:
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK),
                "modules_to_not_convert": self.not_converted()}


@FORMATS.register("fbgemm-fp8", aliases=("fbgemm_fp8",))
class FbgemmFP8Writer(_Float8Writer):
    """FBGEMM FP8: e4m3 weights with one float32 scale per output row (GPU runtime only)."""

    layout = "one scale per output row"

    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": qw.codes.cpu().contiguous(), f"{prefix}.weight_scale": qw.scale.float().cpu().reshape(-1, 1)}

    def quantization_config(self) -> dict:
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": self.not_converted()}


def read_quantized(folder: Path, config: dict | None = None) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A fine-grained FP8 or FBGEMM FP8 folder -> ({module: QuantizedWeight}, {name: other tensor})."""
    tensors, _ = load_folder(folder)
    modules, rest = group_modules(tensors, ("weight", "weight_scale_inv", "weight_scale"))
    qt = get_qtype("fp8")
    qws = {}
    for prefix, t in modules.items():
        if "weight_scale_inv" in t:
            qws[prefix] = QuantizedWeight(qt, t["weight"], t["weight_scale_inv"], None, "block", None, block=BLOCK)
        elif "weight_scale" in t:
            qws[prefix] = QuantizedWeight(qt, t["weight"], t["weight_scale"].reshape(-1, 1), None, "channel")
        else:
            rest.update({f"{prefix}.{k}": v for k, v in t.items()})
    return qws, rest


register_reader("fp8", read_quantized)
register_reader("fbgemm_fp8", read_quantized)
