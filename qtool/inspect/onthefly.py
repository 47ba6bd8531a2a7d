"""`qtool inspect` rows for the on-the-fly families' layouts: optimum-quanto and Quark (from the
safetensors headers) and hqq (from qmodel.pt, read with torch's weights-only unpickler, tensors
memory-mapped). A quantized module is one row: its logical [out, in] shape and parameter count,
its codes + scales + zero points/shifts as its stored bytes; quanto's activation scales (ones)
are bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

from qtool.inspect.report import InspectReport, TensorReport, kv_cache_from_config, layer_kind, method_name


def quanto_rows(tensors: list, qmap: dict, shapes: dict[str, tuple[int, int]]) -> list[TensorReport]:
    """StoredTensor rows of a quanto folder -> one row per quantized module, plain rows otherwise."""
    from qtool.formats.quanto import quanto_group_size

    parts: dict[str, dict] = {}
    rows = []
    for t in tensors:
        module, sep, suffix = t.name.partition(".weight.")
        base, _, last = t.name.rpartition(".")
        if sep and module in qmap:
            parts.setdefault(module, {})[suffix] = t
        elif base in qmap and last in ("input_scale", "output_scale"):
            parts.setdefault(base, {})[last] = t
        else:
            rows.append(TensorReport(t.name, layer_kind(t.name), t.dtype, t.shape, math.prod(t.shape), t.nbytes))
    for module, p in parts.items():
        qname = qmap[module].get("weights", "?")
        shape = shapes.get(module) or tuple(p["_data"].shape if "_data" in p else ())
        stored = sum(v.nbytes for k, v in p.items() if k.startswith("_"))
        extra = sum(v.nbytes for k, v in p.items() if not k.startswith("_"))
        if qname in ("qint4", "qint2") and len(shape) == 2:
            g = quanto_group_size(shape[1])
            label = f"int{qname[4:]} {'g' + str(g) if g else 'channel'} asym"
        else:
            label = {"qint8": "int8 channel sym", "qfloat8_e4m3fn": "fp8 channel"}.get(qname, qname)
        name = f"{module}.weight"
        rows.append(TensorReport(name, layer_kind(name), label, tuple(shape), math.prod(shape), stored, extra, quantized=True))
    return rows


def quark_rows(tensors: list, qconfig: dict) -> list[TensorReport]:
    weight = (qconfig.get("global_quant_config") or {}).get("weight") or {}
    by_module: dict[str, dict] = {}
    for t in tensors:
        base, _, suffix = t.name.rpartition(".")
        by_module.setdefault(base, {})[suffix] = t
    quantized = {m for m, p in by_module.items() if "weight_scale" in p}
    rows = []
    for t in tensors:
        base, _, suffix = t.name.rpartition(".")
        if base not in quantized or suffix not in ("weight", "weight_scale", "weight_zero_point"):
            rows.append(TensorReport(t.name, layer_kind(t.name), t.dtype, t.shape, math.prod(t.shape), t.nbytes))
    dtype = weight.get("dtype", "?")
    for m in sorted(quantized):
        p = by_module[m]
        w = p["weight"]
        shape = (w.shape[1] * 8, w.shape[0]) if dtype in ("int4", "uint4") else tuple(w.shape)
        if dtype in ("int4", "uint4"):
            label = f"{dtype} g{weight.get('group_size')} {'sym' if weight.get('symmetric') else 'asym'}"
        else:
            label = f"fp8 {str(weight.get('qscheme', '')).removeprefix('per_')}"
        stored = sum(p[s].nbytes for s in ("weight", "weight_scale", "weight_zero_point") if s in p)
        name = f"{m}.weight"
        rows.append(TensorReport(name, layer_kind(name), label, tuple(shape), math.prod(shape), stored, quantized=True))
    return rows


def hqq_report(folder: Path, ctx: int, batch: int) -> InspectReport:
    import json

    import torch

    from qtool.formats.hqq import WEIGHTS_FILE, load_modules, _value

    config = json.loads((folder / "config.json").read_text())
    prov = json.loads((folder / "qtool.json").read_text()) if (folder / "qtool.json").is_file() else None
    rows = []
    tied = bool(config.get("tie_word_embeddings"))
    for module, state in load_modules(folder).items():
        if "W_q" not in state:
            for k, t in state.items():
                if isinstance(t, torch.Tensor) and not (tied and module == "lm_head"):
                    name = f"{module}.{k}"
                    rows.append(TensorReport(name, layer_kind(name), _dtype(t), tuple(t.shape), t.numel(), t.numel() * t.element_size()))
            continue
        shape = tuple(int(x) for x in _value(state["shape"]))
        bits, g = int(_value(state["nbits"])), int(_value(state["group_size"]))
        stored = sum(state[k].numel() * state[k].element_size() for k in ("W_q", "scale", "zero"))
        grid = f"g{g}" if g < shape[1] else "channel"
        name = f"{module}.weight"
        rows.append(TensorReport(name, layer_kind(name), f"int{bits} {grid} float-zero", shape, math.prod(shape), stored, quantized=True))
        if isinstance(state.get("bias"), torch.Tensor):
            b = state["bias"]
            rows.append(TensorReport(f"{module}.bias", layer_kind(name), _dtype(b), tuple(b.shape), b.numel(), b.numel() * b.element_size()))
    notes = ["lm_head is tied to the embeddings (stored again in qmodel.pt for hqq's loader; counted once)"] if tied else []
    files = {WEIGHTS_FILE: (folder / WEIGHTS_FILE).stat().st_size}
    return InspectReport(str(folder), "hqq", WEIGHTS_FILE, method_name(prov, True, "unknown"), files, rows, ctx, batch,
                         kv_cache_from_config(config, ctx, batch), prov, notes)


def _dtype(t) -> str:
    from qtool.model.safetensors_header import TORCH_TO_ST

    return TORCH_TO_ST.get(t.dtype, str(t.dtype))
