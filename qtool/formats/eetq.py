"""EETQ checkpoints (`-f eetq`, `quant_method: eetq`): int8 weights per output channel, in the
parameters of transformers' `EetqLinear`:
  `prefix.weight`          int8 [in, out]   the codes, transposed
  `prefix.weight_scales`   float16 [out]    W[o, i] = weight[i, o] * weight_scales[o]
Symmetric, one fp16 scale per output row (qtool's int8 grid, scales rounded to fp16 before the
codes are chosen). The runtime is a CUDA kernel (`w8_a16_gemm`, fetched by transformers from the
Hub's kernels-community/quantization-eetq); nothing runs it on a CPU. tests/test_otf_formats.py
checks these tensors against `EetqLinear`'s parameters and, where CUDA is present, loads the
folder and compares what the kernel computes with qtool's dequantization.

UNPROVEN on a GPU: transformers' own EETQ path stores what the kernel package's
`quant_weights(w.T, int8, False)` returns, and that package also exposes `preprocess_weights`
(the CUTLASS mixed-GEMM reordering of FasterTransformer/TensorRT-LLM: row permutation and
interleaving, architecture-dependent). If the stored int8 matrix must be in that order, this
plain transposed layout loads without MISSING keys but computes wrong outputs; the GPU test
(`test_gpu_loads_fbgemm_fp8_and_eetq`) is the judge.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.hf_quantized import HFQuantizedWriter, group_modules, load_folder, register_reader
from qtool.qtypes import get_qtype


@FORMATS.register("eetq")
class EETQWriter(HFQuantizedWriter):
    """EETQ: int8 per-channel weights, transposed, fp16 scales (CUDA runtime only)."""

    qtype_kinds = ("int",)
    default_qtype = "int8"

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        if recipe.qtype != "int8":
            raise UnsupportedError(f"--format eetq holds int8 weights, not {recipe.qtype}")
        if recipe.strategy != "channel" or not recipe.symmetric:
            raise UnsupportedError("--format eetq is symmetric per output channel: use -g channel, no --asym")

    def spec_options(self, recipe: QuantRecipe) -> dict:
        return {"scale_dtype": torch.float16}

    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": qw.codes.cpu().t().contiguous(),
                f"{prefix}.weight_scales": qw.scale.reshape(-1).to(torch.float16).cpu()}

    def quantization_config(self) -> dict:
        return {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": self.not_converted()}


def read_quantized(folder: Path, config: dict | None = None) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    tensors, _ = load_folder(folder)
    modules, rest = group_modules(tensors, ("weight", "weight_scales"))
    qws = {}
    for prefix, t in modules.items():
        if "weight_scales" in t:
            qws[prefix] = QuantizedWeight(get_qtype("int8"), t["weight"].t().contiguous(), t["weight_scales"].unsqueeze(1), None, "channel")
        else:
            rest.update({f"{prefix}.{k}": v for k, v in t.items()})
    return qws, rest


register_reader("eetq", read_quantized)
