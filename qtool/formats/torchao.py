"""torchao checkpoints (`quant_method: torchao`), in the safetensors layout transformers + torchao
0.18 save and load: each quantized Linear `prefix` holds its tensor subclass's inner tensors as
`prefix._weight_<name>`, and the safetensors `__metadata__` describes the subclass, per weight:

  metadata["prefix.weight"] = {"_type": "Int8Tensor" | "IntxUnpackedToInt8Tensor" | "Float8Tensor",
                               "_data": {block_size, dtype, ...}, "_tensor_data_names": [...]}
  metadata["tensor_names"]  = every logical tensor name (weights, not inner tensors), in order
  plain tensors:              {"_type": "Tensor"}

Types (learned by saving a tiny model with torchao's own configs):
  int8  Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig -> Int8Tensor:
        qdata int8 [out, in], scale float32 [out, 1], zero_point int8 [out, 1] (zeros);
        the dynamic variant adds `act_quant_kwargs` (per-row symmetric int8 activations)
  int4  IntxWeightOnlyConfig(int4, PerGroup(g)) -> IntxUnpackedToInt8Tensor (the CPU route;
        Int4WeightOnlyConfig needs CUDA): qdata int8 codes [out, in] unpacked, scale [out, in/g]
        in the weight dtype, zero_point int8 [out, in/g]; int2 / int3 the same with their range
  fp8   Float8WeightOnlyConfig -> Float8Tensor: qdata float8_e4m3fn [out, in], scale float32 [out, 1]
W = (qdata - zero_point) * scale, per block_size [1, in] or [1, g]. The grids are torchao's
(symmetric max|w| / ((qmax - qmin) / 2), compressed-tensors' too); with -m rtn the codes and scales
are computed with torchao's own arithmetic (core/peer_rtn.py), so they equal what torchao's
quantize_ makes of the same bf16 weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.formats.hf_quantized import HFQuantizedWriter, register_reader, load_folder
from qtool.qtypes import get_qtype

ACTIVATIONS = ("int8",)
_DTYPE = "torch.dtype"


def _t(type_name: str, data: object) -> dict:
    return {"_type": type_name, "_data": data}


def _config_type(qtype: str, group: int | None, symmetric: bool, dynamic: bool) -> dict:
    """The `quant_type` entry of the config: torchao's AOBaseConfig, serialised as transformers does."""
    per_row = {"_data": {"dim": -1}, "_type": "PerRow", "_version": 1}
    if qtype == "int8" and dynamic:
        data = {"act_mapping_type": _t("MappingType", "SYMMETRIC"), "granularity": per_row, "reduce_range": False,
                "set_inductor_config": True, "weight_only_decode": False}
        return {"_data": data, "_type": "Int8DynamicActivationInt8WeightConfig", "_version": 2}
    if qtype == "int8":
        return {"_data": {"granularity": per_row, "group_size": None, "set_inductor_config": True},
                "_type": "Int8WeightOnlyConfig", "_version": 2}
    if qtype == "fp8_e4m3":
        return {"_data": {"granularity": per_row, "set_inductor_config": True, "weight_dtype": _t(_DTYPE, "float8_e4m3fn")},
                "_type": "Float8WeightOnlyConfig", "_version": 2}
    data = {"granularity": {"_data": {"group_size": group}, "_type": "PerGroup", "_version": 1},
            "intx_choose_qparams_algorithm": _t("IntxChooseQParamsAlgorithm", "AFFINE"),
            "intx_packing_format": _t("IntxPackingFormat", "UNPACKED_TO_INT8"),
            "mapping_type": _t("MappingType", "SYMMETRIC" if symmetric else "ASYMMETRIC"),
            "scale_dtype": None, "weight_dtype": _t(_DTYPE, qtype)}
    return {"_data": data, "_type": "IntxWeightOnlyConfig", "_version": 2}


def tensor_metadata(qw: QuantizedWeight, dtype_name: str, dynamic: bool) -> dict:
    """The safetensors metadata entry describing one quantized weight's torchao tensor subclass."""
    out_f, in_f = qw.shape
    block = [1, qw.group_size if qw.strategy == "group" else in_f]
    dtype = _t(_DTYPE, dtype_name)
    name = qw.qtype.name
    if name == "fp8_e4m3":
        data = {"block_size": block, "mm_config": None, "act_quant_kwargs": None,
                "kernel_preference": _t("KernelPreference", "AUTO"), "dtype": dtype}
        return {"_type": "Float8Tensor", "_data": data, "_tensor_data_names": ["qdata", "scale"]}
    if name == "int8":
        act = None
        if dynamic:
            act = _t("QuantizeTensorToInt8Kwargs", {"granularity": _t("PerRow", {"dim": -1}),
                                                    "mapping_type": _t("MappingType", "SYMMETRIC"), "reduce_range": False})
        data = {"act_quant_kwargs": act, "reduce_range": False, "block_size": block, "dtype": dtype}
        return {"_type": "Int8Tensor", "_data": data, "_tensor_data_names": ["zero_point", "qdata", "scale"]}
    data = {"target_dtype": _t(_DTYPE, name), "block_size": block, "dtype": dtype, "activation_quantization": None}
    return {"_type": "IntxUnpackedToInt8Tensor", "_data": data, "_tensor_data_names": ["qdata", "scale", "zero_point"]}


def pack_torchao(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> torchao's inner tensors (name without the `_weight_` prefix)."""
    t = {"qdata": qw.codes.cpu().contiguous(), "scale": qw.scale.cpu().contiguous()}
    if qw.qtype.name != "fp8_e4m3":
        zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale, dtype=torch.int8)
        t["zero_point"] = zp.cpu().to(torch.int8).contiguous()
    return t


def unpack_torchao(meta: dict, inner: dict[str, torch.Tensor], where: str) -> QuantizedWeight:
    kind = meta.get("_type")
    data = meta.get("_data") or {}
    if kind == "Float8Tensor":
        qt = get_qtype("fp8")
    elif kind == "Int8Tensor":
        qt = get_qtype("int8")
    elif kind == "IntxUnpackedToInt8Tensor":
        qt = get_qtype(data["target_dtype"]["_data"])
    else:
        raise FormatError(f"{where}: torchao tensor type {kind!r} is not one qtool reads")
    qdata, scale = inner["qdata"], inner["scale"]
    block = data["block_size"]
    out_f, in_f = qdata.shape
    strategy, g = ("channel", None) if block[-1] == in_f else ("group", int(block[-1]))
    zp = inner.get("zero_point")
    zp = None if zp is None or not zp.any() else zp
    return QuantizedWeight(qt, qdata, scale.reshape(out_f, -1), zp, strategy, g)


@FORMATS.register("torchao", aliases=("ao",))
class TorchAOWriter(HFQuantizedWriter):
    """transformers + torchao 0.18: int8 weight-only (or with dynamic int8 activations), intx
    (int2/3/4) weight-only per group, float8 weight-only, all on CPU."""

    default_qtype = "int8"

    def __init__(self, activations: str | None = None, **options: object) -> None:
        super().__init__(**options)
        if activations is not None and activations.lower() not in ACTIVATIONS:
            raise UsageError(f"--activations {activations!r}: -f torchao takes {', '.join(ACTIVATIONS)} (dynamic per-token int8)")
        self.dynamic = activations is not None

    def check_recipe(self, recipe: QuantRecipe) -> None:
        super().check_recipe(recipe)
        qt = recipe.weight_type
        if qt.name in ("int8", "fp8_e4m3"):
            if recipe.strategy != "channel" or not recipe.symmetric:
                raise UnsupportedError(f"--format torchao {qt.name} is symmetric per output channel (PerRow): use -g channel, no --asym")
        elif recipe.strategy != "group":
            raise UnsupportedError(f"--format torchao {qt.name} (IntxWeightOnlyConfig) is per group: give --group-size, e.g. 32")
        if self.dynamic and qt.name != "int8":
            raise UnsupportedError(f"--activations int8: torchao's dynamic-activation config here is int8 x int8, not {qt.name} weights")

    def spec_options(self, recipe: QuantRecipe) -> dict:
        # torchao keeps int8 / float8 row scales in float32, intx group scales in the weight dtype;
        # RTN computes codes and scales with torchao's own arithmetic (core/peer_rtn.py)
        extra = {"scale_dtype": torch.float32} if recipe.qtype in ("int8", "fp8_e4m3") else {}
        return {**extra, "rounding": "torchao"}

    def begin(self, out: Path, source, recipe: QuantRecipe | None) -> None:
        super().begin(out, source, recipe)
        self.meta: dict[str, str] = {}
        self.groups: set[int] = set()  # the group sizes actually written (the request may have been lowered)

    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        if qw.strategy == "group":
            self.groups.add(int(qw.group_size))  # type: ignore[arg-type]
        self.meta[f"{prefix}.weight"] = json.dumps(tensor_metadata(qw, self.dtype_name, self.dynamic))
        return {f"{prefix}._weight_{k}": v for k, v in pack_torchao(qw).items()}

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        super().add_tensor(name, t)
        self.meta[name] = json.dumps({"_type": "Tensor"})

    def file_metadata(self) -> dict[str, str]:
        return {**self.meta, "tensor_names": json.dumps(list(self.meta))}

    def quantization_config(self) -> dict:
        r = self.recipe
        assert r is not None
        return {
            "quant_method": "torchao",
            # PerGroup(g) names the group the tensors hold: the model-wide size choose_groups settled on
            # (e.g. 64 for -g 128 on 576-wide rows, said in the run's notes), not the request
            "quant_type": {"default": _config_type(r.qtype, max(self.groups) if len(self.groups) == 1 else r.group_size,
                                                   r.symmetric, self.dynamic)},
            "modules_to_not_convert": self.not_converted(),
            "include_input_output_embeddings": False,
            "untie_embedding_weights": False,
        }


def read_quantized(folder: Path, config: dict | None = None) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A torchao safetensors folder -> ({module: QuantizedWeight}, {name: plain tensor})."""
    tensors, metadata = load_folder(folder)
    names = json.loads(metadata.get("tensor_names", "[]"))
    if not names:
        raise FormatError(f"{folder}: no torchao `tensor_names` in the safetensors metadata")
    qws, rest = {}, {}
    for name in names:
        meta = json.loads(metadata[name])
        if meta.get("_type") == "Tensor":
            rest[name] = tensors[name]
            continue
        prefix = name[: -len(".weight")]
        inner = {k: tensors[f"{prefix}._weight_{k}"] for k in meta.get("_tensor_data_names", [])}
        qws[prefix] = unpack_torchao(meta, inner, name)
    return qws, rest


register_reader("torchao", read_quantized)
