"""AWQ checkpoints in AutoAWQ's "GEMM" layout (`quant_method: awq`, `version: gemm`), the one
transformers loads (through gptqmodel's kernels in transformers 5.x) and vLLM runs.

Per quantized Linear `prefix` (W is [out, in], groups of g input columns, G = in / g):
  `prefix.qweight` int32 [in, out/8]  unsigned codes of W^T packed 8 per word along the OUTPUT
                                      dim, nibble j of a word = column AWQ_ORDER[j] of its
                                      8-column block (`core/packing.py`)
  `prefix.qzeros`  int32 [G, out/8]   unsigned zero points, same packing, stored as they are (no -1)
  `prefix.scales`  float16 [G, out]
  `prefix.bias`    unchanged, if the layer has one
W^T[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o].

Symmetric weights get the zero point 2^(b-1) (the layout has no symmetric variant). The layout has
no group map (no act-order) and no partial groups; gptqmodel's CPU kernels take group sizes up to
128 and output widths that are multiples of 8. 4-bit only: the nibble order is defined for 4 bits
(AutoAWQ and vLLM's AWQ kernels are 4-bit). transformers converts every nn.Linear except those
listed in `modules_to_not_convert`, so every linear left unquantized is listed there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.packing import pack_awq_order, unpack_awq_order
from qtool.core.qweight import QuantizedWeight
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.compressed_tensors import EXPERT_RE
from qtool.formats.packed_folder import PackedFolderWriter
from qtool.model.source import CheckpointSource

AWQ_BITS = (4,)
AWQ_GROUP_SIZES = (16, 32, 64, 128)  # gptqmodel's AWQ CPU kernels (AwqTorch): these or -1
SUFFIXES = ("qweight", "qzeros", "scales")
ACCEL_FREE_GROUPS = (-1, 16)  # group sizes (-1: per channel) only gptqmodel's plain torch AWQ kernel runs on CPU


def has_group_map(qw: QuantizedWeight) -> bool:
    """True when the columns' groups are not contiguous (act-order), which AWQ tensors cannot say."""
    return qw.g_idx is not None and not torch.equal(qw.g_idx.long().cpu(), torch.arange(qw.shape[1]) // (qw.group_size or qw.shape[1]))


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight (4-bit, contiguous groups or per channel) -> qweight / qzeros / scales."""
    bits, offset = qw.qtype.bits, -int(qw.qtype.qmin)
    if bits not in AWQ_BITS:
        raise UnsupportedError(f"AWQ GEMM holds 4-bit weights, not {qw.qtype.name}")
    if has_group_map(qw):
        raise UnsupportedError("AWQ GEMM cannot hold an act-order group map (g_idx)")
    out_f, in_f = qw.shape
    if out_f % 8:
        raise UnsupportedError(f"AWQ GEMM packs 8 outputs per int32: {out_f} outputs is not a multiple of 8")
    if qw.strategy == "group" and in_f % qw.group_size:  # type: ignore[operator]
        raise UnsupportedError(f"AWQ GEMM cannot hold a partial group: {in_f} inputs, group size {qw.group_size}")
    codes = (qw.codes.cpu().view(torch.uint8) + offset).t()  # [in, out] unsigned (uint8 wraps like c + offset)
    if qw.zero_point is None:
        zeros = torch.full((qw.n_groups, out_f), offset, dtype=torch.int32)
    else:
        zeros = qw.zero_point.cpu().to(torch.int32).t() + offset  # [G, out]
    return {
        "qweight": pack_awq_order(codes),
        "qzeros": pack_awq_order(zeros),
        "scales": qw.scale.cpu().t().to(torch.float16).contiguous(),
    }


def pack_awq_layer(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """pack_awq, its refusals naming the layer."""
    try:
        return pack_awq(qw)
    except UnsupportedError as e:
        raise UnsupportedError(f"{prefix}: {e}") from None


def unpack_awq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool | None = None) -> QuantizedWeight:
    """The AWQ tensors of one module -> QuantizedWeight (signed codes). `symmetric`: None = decide
    from the zero points (all 2^(b-1) -> symmetric, which dequantizes identically)."""
    from qtool.qtypes import get_qtype

    if bits not in AWQ_BITS:
        raise UnsupportedError(f"AWQ GEMM checkpoints with {bits}-bit weights are not read (4-bit only)")
    qt = get_qtype(f"int{bits}")
    offset = -int(qt.qmin)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_f, out_f = qweight.shape[0], scales.shape[1]
    if qweight.shape[1] * 8 != out_f or qzeros.shape != (scales.shape[0], qweight.shape[1]):
        raise FormatError(f"AWQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)}")
    g = in_f if group_size in (-1, 0, None) else group_size
    if in_f % g or in_f // g != scales.shape[0]:
        raise FormatError(f"AWQ scales {list(scales.shape)} do not match {in_f} inputs in groups of {g}")
    codes = (unpack_awq_order(qweight, out_f) - offset).t().to(torch.int8).contiguous()  # [out, in]
    zeros = (unpack_awq_order(qzeros, out_f) - offset).t().to(torch.int8).contiguous()  # [out, G]
    sym = not zeros.any() if symmetric is None else symmetric
    channel = group_size in (-1, 0, None)
    return QuantizedWeight(qt, codes, scales.t().contiguous(), None if sym else zeros,
                           "channel" if channel else "group", None if channel else group_size)


@FORMATS.register("awq", aliases=("autoawq",))
class AWQWriter(PackedFolderWriter):
    """Safetensors folder in AutoAWQ's GEMM layout (qweight / qzeros / scales)."""

    info_key = "awq"

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        if recipe.weight_type.bits not in AWQ_BITS:
            raise UnsupportedError(f"--format awq holds 4-bit integers (AWQ GEMM), not {recipe.qtype}")
        if recipe.strategy == "group" and recipe.group_size not in AWQ_GROUP_SIZES:
            above = recipe.group_size > max(AWQ_GROUP_SIZES)  # type: ignore[operator]
            raise UnsupportedError(
                f"--group-size {recipe.group_size}: --format awq takes group sizes {', '.join(map(str, AWQ_GROUP_SIZES))} "
                f"or channel{' (gptqmodel CPU kernels hold groups of at most 128)' if above else ''}"
            )
        p = recipe.method_params
        if p.get("act_order") and not p.get("static_groups"):
            raise UnsupportedError("--act-order: --format awq cannot hold act-order group maps; add --static-groups")

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        if any(EXPERT_RE.match(m + ".") for m in quantized):
            raise UnsupportedError("--format awq: MoE experts are not supported (transformers fuses them on load)")
        self.planned = set(quantized)

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        for m, (out_f, _) in self.planned_shapes(source).items():
            if out_f % 8:
                raise UnsupportedError(
                    f"layer {m}: --format awq packs 8 outputs per int32: {out_f} outputs is not a multiple of 8 "
                    "(gptqmodel's kernels need out % 8 == 0); --ignore it"
                )
        super().begin(out, source, recipe)

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        prefix = name[: -len(".weight")]
        self.check_group(prefix, qw)
        self.add_packed(prefix, qw, pack_awq_layer(prefix, qw))

    def quantization_config(self) -> dict:
        r = self.recipe
        assert r is not None
        left = [m for m in self.linears if m not in self.quantized and "embed" not in m.rsplit(".", 1)[-1]]
        g = self.group_size if self.group_size is not None else (r.group_size if r.strategy == "group" else -1)
        cfg = {
            "quant_method": "awq",
            "version": "gemm",
            "bits": r.weight_type.bits,
            "group_size": g,
            "zero_point": True,  # symmetric weights too: their zero points are 2^(b-1)
            "modules_to_not_convert": left or None,
        }
        if g in ACCEL_FREE_GROUPS:
            # gptqmodel's default CPU kernels (torch int4pack) take groups of 32..256 only; its plain
            # torch AWQ kernel takes these. `backend` is a loading option transformers' AwqConfig reads.
            cfg["backend"] = "torch_awq"
        return cfg

    def info(self) -> dict:
        return {**super().info(), "symmetric": bool(self.recipe and self.recipe.symmetric)}
