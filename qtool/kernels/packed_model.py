"""Run a W4 checkpoint from its packed weights: `Int4Linear` modules in a transformers model.

`qtool eval` used to dequantize the checkpoints transformers cannot run on a CPU by itself
(GPTQ without optimum + gptqmodel, asymmetric compressed-tensors) into a dense float32 model:
four bytes per weight. `load_packed_int4` builds the model with its parameters on the meta
device, puts an `Int4Linear` (about 0.55 byte per weight at g128) where the checkpoint holds an
int4 module, and loads the rest (embeddings, norms, head) as usual. Each forward goes through
`qtool.kernels.call("int4_linear", ...)`: a device backend where one takes the input, else the
reference, which dequantizes one layer for that call only. A module the kernels cannot take
(act-order g_idx, widths not a multiple of 8) keeps a dense weight.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Iterator

import torch

from qtool import kernels
from qtool.errors import FormatError, UnsupportedError
from qtool.kernels.int4 import Int4Weight


class Int4Linear(torch.nn.Module):
    """A Linear whose weight is an `Int4Weight` (buffers, so `.to(device)` moves them)."""

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = w.in_features, w.out_features, w.group_size
        self.register_buffer("packed", w.packed)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", w.zero)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._w: Int4Weight | None = None

    @property
    def weight_int4(self) -> Int4Weight:
        if self._w is None:
            self._w = Int4Weight(self.packed, self.scale, self.zero, self.group_size, self.in_features)
        return self._w

    def _apply(self, fn, recurse: bool = True):  # a device or dtype move invalidates backend caches
        self._w = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.call("int4_linear", x, self.weight_int4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def packable(folder: Path) -> str | None:
    """"gptq" or "compressed-tensors" when `qtool eval` would otherwise dequantize this W4 folder
    densely (its runtime is missing, or transformers dequantizes it on load); else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "gptq":
        runtime = all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))
        return "gptq" if q.get("bits") == 4 and not runtime else None
    if q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized":
        weights = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
        if weights and all(w.get("num_bits") == 4 and w.get("type") == "int" for w in weights) \
                and any(w.get("symmetric") is False for w in weights):
            return "compressed-tensors"
    return None


def _quantized_modules(folder: Path, kind: str, config: dict):
    """(prefix -> QuantizedWeight, other tensors) of a GPTQ or compressed-tensors folder."""
    if kind == "gptq":
        from qtool.formats.gptq import read_quantized

        return read_quantized(folder)
    from safetensors import safe_open

    from qtool.formats.compressed_tensors import scheme_for, unpack_module

    qconfig = config["quantization_config"]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                prefix, _, suffix = name.rpartition(".")
                if suffix.startswith("weight_") and scheme_for(prefix, qconfig):
                    modules.setdefault(prefix, {})[suffix] = h.get_tensor(name)
                else:
                    rest[name] = h.get_tensor(name)
    return {p: unpack_module(t, scheme_for(p, qconfig)) for p, t in modules.items()}, rest


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers (rotary
    tables) are computed as usual, since a checkpoint does not hold them."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def load_packed_int4(folder: Path, kind: str):
    """A float32 transformers model of `folder` whose int4 linears stay packed (`Int4Linear`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    qweights, rest = _quantized_modules(folder, kind, config)
    hf = {k: v for k, v in config.items() if k != "quantization_config"}
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=torch.float32)
    for prefix in sorted(qweights):
        qw = qweights.pop(prefix)
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            raise FormatError(f"{folder}: quantized module {prefix} is not in the model") from None
        bias = rest.pop(f"{prefix}.bias", None)
        bias = None if bias is None else bias.float()
        try:
            new: torch.nn.Module = Int4Linear(Int4Weight.from_qweight(qw), bias)
        except UnsupportedError:  # a layout the kernels do not take: this one module stays dense
            new = torch.nn.Linear(qw.shape[1], qw.shape[0], bias=bias is not None, device="meta")
            new.load_state_dict({"weight": qw.dequantize(torch.float32), **({"bias": bias} if bias is not None else {})},
                                assign=True)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in rest.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"{folder}: tensors the model has no place for: {', '.join(result.unexpected_keys[:4])}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FormatError(f"{folder}: the checkpoint lacks {', '.join(missing[:4])}")
    return model.eval()
