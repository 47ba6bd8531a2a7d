"""AMD Quark's export layout (`quant_method: quark`), what transformers loads with `amd-quark`
installed (0.13: it swaps each Linear for Quark's QParamsLinear before the weights are read).

Per quantized Linear `m` (names as Quark's `export_safetensors` writes them):
  int4 / uint4, per group (`qscheme: per_group`, `ch_axis: 1`):
    m.weight             int32 [in, out/8]   the codes of the TRANSPOSED weight, 8 output columns
                                             per word in AWQ's nibble order (`pack_method: reorder`,
                                             core/packing.py); int4 as two's-complement nibbles
    m.weight_scale       [in/g, out]         in the checkpoint dtype
    m.weight_zero_point  int32 [in/g, out/8] same packing; 0 for symmetric int4
  fp8_e4m3, per channel / per tensor:
    m.weight             float8_e4m3fn [out, in];  m.weight_scale [out] (per channel) or []
W[o, i] = (q - z) * s. Symmetric integer weights are written as `int4`, asymmetric ones as
`uint4` (codes and zero points + 8). `quantization_config` is Quark's QConfig as a dict
(`global_quant_config.weight`, `exclude`, `export`), one scheme per model; the Linear layers left
in full precision are listed in `exclude`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.packing import pack_awq_order, unpack_awq_order
from qtool.core.qweight import QuantizedWeight, dequantized_state
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, write_folder_files
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.inspect.report import layer_kind
from qtool.model.source import CheckpointSource
from qtool.qtypes import get_qtype

WEIGHTS_FILE = "model.safetensors"
QUARK_VERSION = "0.13"


def weight_spec(dtype: str, strategy: str, group_size: int | None, symmetric: bool) -> dict:
    """Quark's QTensorConfig of the weights, as its exporter serializes it."""
    qscheme = {"group": "per_group", "channel": "per_channel", "tensor": "per_tensor"}[strategy]
    observer = {"group": "PerGroupMinMaxObserver", "channel": "PerChannelMinMaxObserver", "tensor": "PerTensorMinMaxObserver"}[strategy]
    return {
        "block_size": None, "ch_axis": {"group": 1, "channel": 0, "tensor": None}[strategy], "dtype": dtype,
        "enable_buffer_reuse": False, "group_size": group_size, "is_dynamic": False, "is_scale_quant": False,
        "max_input_numel": 4194304, "mx_element_dtype": None, "observer_cls": observer, "qscheme": qscheme,
        "round_method": "half_even", "scale_calculation_mode": None, "scale_format": None, "scale_type": "float",
        "symmetric": symmetric, "zero_point_type": "int32",
    }


def quark_config(weight: dict, exclude: list[str]) -> dict:
    return {
        "algo_config": None, "exclude": exclude,
        "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder", "weight_format": "real_quantized",
                   "weight_merge_groups": None},
        "global_quant_config": {"bias": None, "input_tensors": None, "output_tensors": None, "target_device": None, "weight": weight},
        "kv_cache_post_rope": False, "kv_cache_quant_config": {}, "layer_quant_config": {}, "layer_type_quant_config": {},
        "quant_method": "quark", "quant_mode": "eager_mode", "softmax_quant_spec": None, "version": QUARK_VERSION,
    }


def pack_quark(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {suffix: tensor} of one module (`weight`, `weight_scale`, `weight_zero_point`)."""
    if not qw.qtype.is_int:
        scale = qw.scale.cpu().reshape(-1) if qw.strategy == "channel" else qw.scale.cpu().reshape(())
        return {"weight": qw.codes.cpu().contiguous(), "weight_scale": scale.contiguous()}
    codes = qw.codes.cpu().t().to(torch.int32)  # [in, out], signed
    zero = torch.zeros(qw.scale.t().shape, dtype=torch.int32) if qw.zero_point is None else qw.zero_point.cpu().t().to(torch.int32)
    if qw.zero_point is not None:  # uint4
        codes, zero = codes + 8, zero + 8
    return {"weight": pack_awq_order(codes & 0xF), "weight_scale": qw.scale.cpu().t().contiguous(),
            "weight_zero_point": pack_awq_order(zero & 0xF)}


def unpack_quark(parts: dict[str, torch.Tensor], weight: dict, where: str) -> QuantizedWeight:
    dtype, qscheme = weight.get("dtype"), weight.get("qscheme")
    if dtype == "fp8_e4m3" and qscheme in ("per_channel", "per_tensor"):
        w = parts["weight"]
        scale = parts["weight_scale"].reshape(-1, 1) if qscheme == "per_channel" else parts["weight_scale"].reshape(1, 1)
        return QuantizedWeight(get_qtype("fp8_e4m3"), w, scale, None, "channel" if qscheme == "per_channel" else "tensor")
    if dtype not in ("int4", "uint4") or qscheme != "per_group" or weight.get("ch_axis") not in (1, -1):
        raise FormatError(f"{where}: Quark weights {dtype} {qscheme} are not read (int4/uint4 per_group, fp8_e4m3 per_channel/tensor)")
    scale = parts["weight_scale"].t().contiguous()  # [out, G]
    u = unpack_awq_order(parts["weight"], parts["weight"].shape[-1] * 8).t()  # [out, in]
    z = unpack_awq_order(parts["weight_zero_point"], parts["weight_zero_point"].shape[-1] * 8).t()
    if dtype == "uint4":
        codes, zero = u - 8, (z - 8).to(torch.int8)
    else:
        codes, zero = torch.where(u >= 8, u - 16, u), None
        if torch.any(z):
            raise FormatError(f"{where}: symmetric int4 with non-zero zero points")
    return QuantizedWeight(get_qtype("int4"), codes.to(torch.int8).contiguous(), scale, zero, "group", int(weight["group_size"]))


@FORMATS.register("quark", aliases=("amd-quark",))
class QuarkWriter(FormatWriter):
    """Quark's safetensors layout with its QConfig-shaped quantization_config."""

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        qt = recipe.weight_type
        if qt.is_int and (qt.bits != 4 or recipe.strategy != "group"):
            raise UnsupportedError(f"--format quark holds int4/uint4 per group (-b 4 -g N) and fp8; not {recipe.qtype} {recipe.strategy}")

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        self.planned, self.linears = set(quantized), linears

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})
        self.spec: dict | None = None
        self.done: set[str] = set()
        shapes = {t.name[: -len(".weight")]: t.shape for t in source.tensors() if t.name.endswith(".weight")}
        if recipe is not None and recipe.weight_type.is_int:
            for m in sorted(getattr(self, "planned", set())):
                if shapes[m][0] % 8:
                    raise UnsupportedError(f"layer {m}: --format quark packs 8 output channels per int32; {shapes[m][0]} outputs")

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        module = name[: -len(".weight")]
        if qw.g_idx is not None:
            raise UnsupportedError(f"{module}: an act-order group map (g_idx) cannot be stored in --format quark")
        if qw.float_zeros:
            raise UnsupportedError(f"{module}: --format quark holds integer zero points, not float ones")
        dtype = "fp8_e4m3" if not qw.qtype.is_int else ("int4" if qw.zero_point is None else "uint4")
        spec = weight_spec(dtype, qw.strategy, qw.group_size, qw.zero_point is None)
        if self.spec is not None and spec != self.spec:
            raise UnsupportedError(f"{module}: --format quark writes one scheme per model; this layer's differs ({dtype} {qw.strategy} {qw.group_size})")
        self.spec = spec
        for suffix, t in pack_quark(qw).items():
            self.st.add(f"{module}.{suffix}", t)
        self.done.add(module)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        linears = getattr(self, "linears", [])
        # the 2-D weights left in full precision, less embeddings (Quark only swaps Linear layers)
        exclude = sorted(m for m in linears if m not in self.done and layer_kind(m + ".weight") != "embeddings") or ["lm_head"]
        config = dict(config)
        config["quantization_config"] = quark_config(self.spec or {}, exclude)
        write_folder_files(self.out, self.source, config, provenance)

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()


# -- reading back ------------------------------------------------------------------------------
def is_quark_config(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "quark"


def _excluded(module: str, exclude: list[str]) -> bool:
    import fnmatch

    return any(module == e or fnmatch.fnmatchcase(module, e) or module.endswith("." + e) for e in exclude)


def read_quantized(folder: Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qcfg.get("layer_quant_config") or qcfg.get("layer_type_quant_config"):
        raise FormatError(f"{folder}: Quark per-layer schemes (layer_quant_config) are not read")
    weight = (qcfg.get("global_quant_config") or {}).get("weight") or {}
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    modules = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    qws = {}
    for m in sorted(modules):
        if _excluded(m, qcfg.get("exclude") or []):
            continue
        parts = {s: tensors.pop(f"{m}.{s}") for s in ("weight", "weight_scale", "weight_zero_point") if f"{m}.{s}" in tensors}
        qws[m] = unpack_quark(parts, weight, f"{folder}: {m}")
    return qws, tensors


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dequantized_state(*read_quantized(folder), dtype)
