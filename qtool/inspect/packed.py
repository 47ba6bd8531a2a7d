"""`qtool inspect` rows for the int32-packed layouts: GPTQ (qweight [in·b/32, out]), AWQ GEMM
(qweight [in, out·b/32]) and AutoRound's native format (either of them, by `packing_format`).
From headers and config.json alone (works on the Hub): each module's logical [out, in] comes from
the shapes of `qweight`/`scales` (and `g_idx` where present); codes, scales and zero points are
its stored bits; `g_idx` is bookkeeping."""

from __future__ import annotations

import math

from qtool.errors import FormatError
from qtool.inspect.report import TensorReport, layer_kind
from qtool.model.quantized_source import PACKED_PARTS, Layout

WEIGHT_PARTS = ("qweight", "qzeros", "scales")


def packed_rows(tensors: list, layout: Layout) -> list[TensorReport]:
    """Rows for every tensor of a GPTQ / AWQ / AutoRound checkpoint (`tensors`: StoredTensors)."""
    modules: dict[str, dict] = {}
    order: list = []
    for t in tensors:
        prefix, _, suffix = t.name.rpartition(".")
        if suffix in PACKED_PARTS:
            if prefix not in modules:
                modules[prefix] = {}
                order.append(prefix)
            modules[prefix][suffix] = t
        else:
            order.append(t)
    rows = []
    for item in order:
        if isinstance(item, str):
            rows.append(_module_row(item, modules[item], layout))
        else:
            rows.append(TensorReport(item.name, layer_kind(item.name), item.dtype, item.shape, math.prod(item.shape), item.nbytes))
    return rows


def _module_row(prefix: str, parts: dict, layout: Layout) -> TensorReport:
    if not {"qweight", "scales"} <= set(parts) or len(parts["scales"].shape) != 2:
        raise FormatError(f"{prefix}: packed module has {', '.join(sorted(parts))}; expected qweight and 2-D scales")
    bits = layout.bits_for(prefix)
    qweight, scales = parts["qweight"].shape, parts["scales"].shape
    out_f = scales[1]
    if layout.tensors == "awq":
        in_f = qweight[0]
    else:
        in_f = parts["g_idx"].shape[0] if "g_idx" in parts else qweight[0] * 32 // bits
    g = layout.group_size
    grid = "channel" if g in (None, -1, 0) else f"g{g}"
    if layout.tensors == "awq":
        sym = "" if layout.symmetric is None else (" sym" if layout.symmetric else " asym")
    else:
        sym = " sym" if layout.symmetric or (layout.symmetric is None and layout.tensors == "gptq") else " asym"
    name = f"{prefix}.weight"
    stored = sum(parts[s].nbytes for s in WEIGHT_PARTS if s in parts)
    extra = parts["g_idx"].nbytes if "g_idx" in parts else 0
    return TensorReport(name, layer_kind(name), f"int{bits} {grid}{sym}", (out_f, in_f), out_f * in_f, stored, extra, quantized=True)
