"""GPTQ checkpoints: the layout AutoGPTQ introduced and GPTQModel, transformers (with `optimum` +
`gptqmodel`) and vLLM load.

Per quantized Linear `prefix`:
  `prefix.qweight` int32 [ceil(in*bits/32), out]  unsigned codes (q + 2^(b-1)) of the transposed
                                                  [in, out] weight, densely bit-packed down each
                                                  column (32 codes per `bits` words; 3-bit codes
                                                  cross word boundaries), `core/packing.py`
  `prefix.qzeros`  int32 [G, ceil(out*bits/32)]   unsigned zero points packed along the output dim
  `prefix.scales`  float16 [G, out]               G = ceil(in / group_size); a partial last group
                                                  is fine since g_idx names each column's group
  `prefix.g_idx`   int32 [in]                     group of each input column (j // g, or act order)
  `prefix.bias`    unchanged, if the layer has one
W[o, j] = (qweight[j, o] - zero[g_idx[j], o]) * scales[g_idx[j], o].

Zero points. Symmetric codes get zero 2^(b-1). The classic `checkpoint_format: "gptq"` (v1) stores
every zero point *minus one* (an old AutoGPTQ quirk that loaders undo), so it cannot hold an
unsigned zero of 0, which asymmetric grids produce for groups with no negative weight. Hence:
symmetric -> "gptq" (v1, what every GPTQ loader reads); asymmetric -> "gptq_v2" (zero points
stored as they are; GPTQModel, and transformers through it, load v2; v1-only loaders don't).

Scales are float16: GPTQModel's modules hold float16 `scales` buffers. bf16 -> fp16 is exact for
values in fp16's normal range (>= 2^-14); a scale that is not is counted in qtool.json
(`gptq.inexact_fp16_scales`) and the reader below returns what was stored, so references agree
with the file. One group size per model (the config holds one), from GPTQModel's kernel list. Where the group size
does not divide a layer's width the config asks for GPTQModel's plain torch kernel (`backend`).
3-bit needs layer widths that are multiples of 32 (GPTQModel unpacks 32 codes at a time).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qtool import __version__
from qtool.config import QuantRecipe
from qtool.core.packing import pack_bits, unpack_bits
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter
from qtool.formats.compressed_tensors import EXPERT_RE
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource

WEIGHTS_FILE = "model.safetensors"
GPTQ_BITS = (2, 3, 4, 8)
# group sizes GPTQModel's kernels take (its torch kernel: these, or -1); any other fails on load
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_format(symmetric: bool) -> str:
    return "gptq" if symmetric else "gptq_v2"


def pack_gptq(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> the four GPTQ tensors of one module (suffix -> tensor)."""
    bits, offset = qw.qtype.bits, -int(qw.qtype.qmin)  # offset = 2^(b-1)
    out_f, in_f = qw.shape
    codes = qw.codes.cpu().view(torch.uint8) + offset  # uint8 wraps exactly like c + offset
    if qw.zero_point is None:
        zeros = torch.full((out_f, qw.n_groups), offset, dtype=torch.int32)
    else:
        zeros = qw.zero_point.cpu().to(torch.int32) + offset
    if fmt == "gptq":  # v1: zero - 1 (never negative here: only symmetric layers are written v1)
        zeros = zeros - 1
        assert int(zeros.min()) >= 0
    g_idx = qw.group_index().to(device="cpu", dtype=torch.int32)
    return {
        "qweight": pack_bits(codes, bits, dim=1).t().contiguous(),  # [in*b/32, out]
        "qzeros": pack_bits(zeros.t(), bits, dim=1),  # [G, out*b/32]
        "scales": qw.scale.cpu().t().to(torch.float16).contiguous(),  # [G, out]
        "g_idx": g_idx,
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, fmt: str, group_size: int) -> QuantizedWeight:
    """The GPTQ tensors of one module -> QuantizedWeight (signed codes, as qtool holds them)."""
    from qtool.qtypes import get_qtype

    qt = get_qtype(f"int{bits}")
    offset = -int(qt.qmin)
    g_idx = tensors["g_idx"].to(torch.int32)
    scales = tensors["scales"]
    in_f, out_f = g_idx.numel(), scales.shape[1]
    codes = (unpack_bits(tensors["qweight"], bits, in_f, dim=0).t() - offset).to(torch.int8)
    zeros = unpack_bits(tensors["qzeros"], bits, out_f, dim=1).t()  # [out, G] unsigned
    if fmt == "gptq":
        zeros = zeros + 1
    zeros = (zeros - offset).to(torch.int8)
    g = in_f if group_size == -1 else group_size
    trivial = torch.equal(g_idx.long(), torch.arange(in_f) // g)
    return QuantizedWeight(
        qt,
        codes.contiguous(),
        scales.t().contiguous(),
        None if fmt == "gptq" and not zeros.any() else zeros,  # symmetric: zero 2^(b-1) -> None
        "group" if group_size != -1 else "channel",
        group_size if group_size != -1 else None,
        None if trivial else g_idx,
    )


@FORMATS.register("gptq")
class GPTQWriter(FormatWriter):
    """Safetensors folder in the GPTQ layout (qweight / qzeros / scales / g_idx)."""

    qtype_kinds = ("int",)
    # transformers fuses per-expert checkpoint linears into 3-D parameters on load; GPTQ loaders
    # replace nn.Linear modules only, so experts stay in full precision (a summary note says so)
    holds_experts = False
    partial_groups = True  # g_idx maps every column to its group, so a last group may be narrower
    # per-layer widths (--target-bpw): `bits` is the most common one, the others are GPTQModel
    # `dynamic` overrides, one exact module pattern each ("+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8})
    mixed_bits = True

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)  # fp8 -> UnsupportedError
        if recipe.weight_type.bits not in GPTQ_BITS:
            raise UnsupportedError(f"--format gptq holds {', '.join(map(str, GPTQ_BITS))}-bit integers, not {recipe.qtype}")
        if recipe.strategy == "group" and recipe.group_size not in GPTQ_GROUP_SIZES:
            raise UnsupportedError(
                f"--group-size {recipe.group_size}: GPTQ loaders (GPTQModel's kernels) take group sizes "
                f"{', '.join(map(str, GPTQ_GROUP_SIZES))} or channel"
            )

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        """The GPTQ config quantizes every Linear of every block whose name ends with one of
        `modules_in_block_to_quantize`; refuse a selection that rule cannot express."""
        if any(EXPERT_RE.match(m + ".") for m in quantized):
            raise UnsupportedError("--format gptq: MoE experts are not supported yet (transformers fuses them on load)")
        in_block = self.structure.block_of if self.structure is not None else _block_suffix
        blocks = [m for m in linears if in_block(m + ".")]
        outside = sorted(m for m in quantized if not in_block(m + "."))
        if outside:
            raise UnsupportedError(f"layer {outside[0]}: --format gptq quantizes only Linear layers inside the language "
                                   "model's decoder blocks (its loaders convert those alone)")
        self.planned = set(quantized)
        suffixes = {_block_suffix(m) for m in quantized}
        left = [m for m in blocks if _block_suffix(m) in suffixes and m not in quantized]
        if left:
            raise UnsupportedError(
                f"layer {left[0]}: --format gptq quantizes a layer in every block or in none "
                f"(its config names layers by their name inside a block)"
            )

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.linears = [t.name[: -len(".weight")] for t in source.tensors() if t.name.endswith(".weight") and len(t.shape) == 2]
        self.quantized: set[str] = set()
        self.bits: dict[str, int] = {}  # module -> its width
        self.desc_act = False
        self.inexact_scales = 0
        self.fmt = checkpoint_format(recipe.symmetric if recipe else True)
        self.partial = False
        if recipe and recipe.weight_type.bits == 3:
            # GPTQModel unpacks 3-bit codes and zero points in whole blocks of 32 (3 int32 words)
            shapes = {t.name[: -len(".weight")]: t.shape for t in source.tensors() if t.name.endswith(".weight")}
            for m in sorted(getattr(self, "planned", set())):
                out_f, in_f = shapes[m]
                if out_f % 32 or in_f % 32:
                    raise UnsupportedError(
                        f"layer {m}: --format gptq at 3 bits needs input and output widths that are multiples "
                        f"of 32 (GPTQModel unpacks 3-bit codes 32 at a time); it is {out_f}x{in_f}"
                    )
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        prefix = name[: -len(".weight")]
        if qw.float_zeros:  # the pipeline rounds them first (with_integer_zeros); never store them silently
            raise UnsupportedError(f"{prefix}: --format {self.registry_name} holds integer zero points, not float ones")
        if qw.symmetric != (self.fmt == "gptq"):
            raise UnsupportedError(f"{prefix}: --format gptq writes one scheme per model; this layer's symmetry differs")
        tensors = pack_gptq(qw, self.fmt)
        back = tensors["scales"].to(qw.scale.dtype)
        self.inexact_scales += int((back != qw.scale.cpu().t()).sum())
        if not torch.isfinite(tensors["scales"]).all():
            raise UnsupportedError(f"{prefix}: a scale overflows float16, which GPTQ kernels use")
        if qw.g_idx is not None:
            self.desc_act = True
        if qw.strategy == "group" and qw.shape[1] % qw.group_size:  # type: ignore[operator]
            self.partial = True
        for suffix, t in tensors.items():
            self.st.add(f"{prefix}.{suffix}", t)
        self.quantized.add(prefix)
        self.bits[prefix] = qw.qtype.bits

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def _bits_config(self) -> tuple[int, dict]:
        """(the config's `bits`, GPTQModel `dynamic` overrides for the layers of other widths)."""
        r = self.recipe
        counts: dict[int, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        if not counts:
            return r.weight_type.bits, {}
        default = max(sorted(counts), key=lambda b: (counts[b], b == r.weight_type.bits))
        mem = self.structure.memory_module if self.structure is not None else (lambda m: m)
        dynamic = {f"+:^{re.escape(mem(m))}$": {"bits": b} for m, b in sorted(self.bits.items()) if b != default}
        return default, dynamic

    def quantization_config(self) -> dict:
        r = self.recipe
        assert r is not None
        in_block = sorted({_block_suffix(m) for m in self.quantized})
        all_in_block = {_block_suffix(m) for m in self.linears if _block_suffix(m)}
        bits, dynamic = self._bits_config()
        cfg = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": r.group_size if r.strategy == "group" else -1,
            "desc_act": self.desc_act,
            "sym": r.symmetric,
            "true_sequential": True,
            "static_groups": False,
            "damp_percent": float(r.to_dict().get("method_params", {}).get("damp", 0.01) or 0.01),
            "lm_head": False,
            "checkpoint_format": self.fmt,
            "format": self.fmt,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"qtool:{__version__}"], "method": r.method},
        }
        if self.partial:
            # GPTQModel's default CPU kernel (TorchAtenLinear) rejects a width the group size does not
            # divide; its plain torch kernel takes the partial group. `backend` is a loading option
            # transformers' GPTQConfig reads from here.
            cfg["backend"] = "torch"
        if dynamic:
            cfg["dynamic"] = dynamic
        if set(in_block) != all_in_block:
            cfg["modules_in_block_to_quantize"] = [in_block]
        if self.structure is not None and self.structure.decoder_layers != "model.layers":
            # where the decoder blocks are in the built model (Gemma 3: model.language_model.layers);
            # the loader otherwise guesses from a list of common paths
            cfg["block_name_to_quantize"] = self.structure.decoder_layers
        return cfg

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        qcfg = self.quantization_config()
        config = dict(config)
        config["quantization_config"] = qcfg
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (self.out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        self.source.write_aux_files(self.out)
        gptq = {"checkpoint_format": self.fmt, "scales_dtype": "float16", "inexact_fp16_scales": self.inexact_scales}
        (self.out / "qtool.json").write_text(json.dumps({"qtool_version": __version__, **provenance, "gptq": gptq}, indent=2) + "\n")

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()


def _block_suffix(module: str) -> str | None:
    """`model.layers.3.mlp.up_proj` -> `mlp.up_proj`; None outside numbered blocks."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1 :]) or None
    return None


# -- reading back: one reader for every packed layout (qtool/model/quantized_source.py) -------------
from qtool.model.quantized_source import read_dequantized, read_quantized  # noqa: E402,F401
