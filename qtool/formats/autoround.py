"""AutoRound's own checkpoint layout (`quant_method: auto-round`), which transformers loads
through the `auto-round` package (`AutoRoundConfig`).

`packing_format` names the tensor layout; qtool writes the two that load on CPU:
  symmetric  -> `auto_round:auto_gptq`: GPTQ v1 tensors (qweight / qzeros with zero points stored
                minus one / scales fp16; no g_idx), loaded by auto-round's pure-torch `torch_zp`
                kernel, which needs input and output widths that are multiples of 32 and a group
                size that divides the input width;
  asymmetric -> `auto_round:auto_awq`: AWQ GEMM tensors (formats/awq.py), 4-bit, loaded through
                gptqmodel's AWQ torch kernel (gptqmodel in the same environment), out % 16 == 0.
Layers of the decoder blocks left unquantized are listed in `extra_config` as `{"bits": 16}`
(AutoRound's own spelling); `block_name_to_quantize` names the block lists.
"""

from __future__ import annotations

from pathlib import Path

from qtool import __version__
from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.awq import AWQ_GROUP_SIZES, has_group_map, pack_awq_layer
from qtool.formats.compressed_tensors import EXPERT_RE
from qtool.formats.gptq import GPTQ_GROUP_SIZES, pack_gptq
from qtool.formats.packed_folder import PackedFolderWriter
from qtool.model.source import CheckpointSource, block_of
SYM_BITS = (2, 3, 4, 8)  # auto-round's torch_zp kernel: 2..8; qtool's integer types
AUTOROUND_VERSION = "0.16.1"  # the loader this layout was proven against (tests/test_autoround_format.py)


def packing_format(symmetric: bool) -> str:
    return "auto_round:auto_gptq" if symmetric else "auto_round:auto_awq"


@FORMATS.register("auto-round", aliases=("autoround",))
class AutoRoundWriter(PackedFolderWriter):
    """Safetensors folder in AutoRound's native layout (GPTQ v1 tensors, or AWQ tensors)."""

    info_key = "auto_round"
    extra_config_files = ("quantization_config.json",)  # auto-round writes it beside config.json
    # partial_groups stays False: torch_zp and AWQ both need the group size to divide the input width

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        bits, g = recipe.weight_type.bits, recipe.group_size
        if recipe.symmetric and bits not in SYM_BITS:
            raise UnsupportedError(f"--format auto-round holds {', '.join(map(str, SYM_BITS))}-bit integers, not {recipe.qtype}")
        if not recipe.symmetric and bits != 4:
            raise UnsupportedError(f"--format auto-round --asym is AWQ-packed (auto_round:auto_awq): 4-bit only, not {recipe.qtype}")
        sizes = GPTQ_GROUP_SIZES if recipe.symmetric else AWQ_GROUP_SIZES
        if recipe.strategy == "group" and g not in sizes:
            raise UnsupportedError(f"--group-size {g}: --format auto-round{'' if recipe.symmetric else ' --asym'} takes "
                                   f"{', '.join(map(str, sizes))} or channel")
        p = recipe.method_params
        if p.get("act_order") and not p.get("static_groups"):
            raise UnsupportedError("--act-order: --format auto-round stores no group map; add --static-groups")

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        if any(EXPERT_RE.match(m + ".") for m in quantized):
            raise UnsupportedError("--format auto-round: MoE experts are not supported yet (transformers fuses them on load)")
        outside = sorted(m for m in quantized if block_of(m + ".") is None)
        if outside:
            raise UnsupportedError(f"layer {outside[0]}: --format auto-round quantizes only Linear layers inside the decoder blocks")
        self.planned = set(quantized)

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.symmetric = recipe.symmetric if recipe else True
        mult = 32 if self.symmetric else 16  # auto-round's backend checkers (torch_zp; gptqmodel:awq_torch)
        for m, (out_f, in_f) in self.planned_shapes(source).items():
            if out_f % mult or in_f % mult:
                raise UnsupportedError(
                    f"layer {m}: --format auto-round{'' if self.symmetric else ' --asym'} needs input and output widths "
                    f"that are multiples of {mult} (auto-round's CPU kernel); it is {out_f}x{in_f}; --ignore it"
                )
        super().begin(out, source, recipe)

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        prefix = name[: -len(".weight")]
        self.check_group(prefix, qw)
        if qw.symmetric != self.symmetric:
            raise UnsupportedError(f"{prefix}: --format auto-round writes one scheme per model; this layer's symmetry differs")
        if self.symmetric:
            if has_group_map(qw):
                raise UnsupportedError(f"{prefix}: --format auto-round cannot hold an act-order group map (g_idx)")
            tensors = pack_gptq(qw, "gptq")
            del tensors["g_idx"]
        else:
            tensors = pack_awq_layer(prefix, qw)
        self.add_packed(prefix, qw, tensors)

    def quantization_config(self) -> dict:
        r = self.recipe
        assert r is not None
        blocks = sorted({block_of(m + ".").rsplit(".", 1)[0] for m in self.quantized})  # type: ignore[union-attr]
        in_blocks = [m for m in self.linears if block_of(m + ".") and block_of(m + ".").rsplit(".", 1)[0] in blocks]  # type: ignore[union-attr]
        cfg = {
            "quant_method": "auto-round",
            "packing_format": packing_format(self.symmetric),
            "bits": r.weight_type.bits,
            "group_size": self.group_size if self.group_size is not None else -1,
            "sym": self.symmetric,
            "data_type": "int",
            "block_name_to_quantize": ",".join(blocks),
            "autoround_version": AUTOROUND_VERSION,
            "iters": int(r.method_params.get("iters", 0) or 0),
            "quantizer": f"qtool:{__version__} ({r.method})",
        }
        left = {m: {"bits": 16} for m in in_blocks if m not in self.quantized}
        if left:
            cfg["extra_config"] = left
        return cfg

    def info(self) -> dict:
        return {**super().info(), "packing_format": packing_format(self.symmetric)}
