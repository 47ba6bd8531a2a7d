"""`qtool inspect` rows for transformers' quantizer layouts (bitsandbytes, torchao, fine-grained
FP8, FBGEMM FP8, EETQ), from headers (plus the few bytes of a bitsandbytes quant_state, where data
may be read): one row per quantized module with its logical [out, in] shape, type and stored bytes.
The layouts are described in qtool/formats/{bitsandbytes,torchao,fp8,eetq,aqlm}.py."""

from __future__ import annotations

import json
import math
from typing import Callable

from qtool.inspect.report import TensorReport, layer_kind

METHODS = ("bitsandbytes", "torchao", "fp8", "fbgemm_fp8", "eetq", "aqlm")
BNB_STATE = "weight.quant_state.bitsandbytes__"
# per quant_method: suffixes of one quantized module's stored weight, then bookkeeping beside it
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bitsandbytes": (("weight", "weight.absmax", "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map", "SCB"),
                     ("weight_format", BNB_STATE + "nf4", BNB_STATE + "fp4")),
    "torchao": (("_weight_qdata", "_weight_scale", "_weight_zero_point"), ()),
    "fp8": (("weight", "weight_scale_inv"), ()),
    "fbgemm_fp8": (("weight", "weight_scale"), ()),
    "eetq": (("weight", "weight_scales"), ()),
    "aqlm": (("codes", "codebooks", "scales"), ()),  # codebooks counted in the weight's bits
}
MARKERS = {"bitsandbytes": ("SCB", BNB_STATE + "nf4", BNB_STATE + "fp4"), "torchao": ("_weight_qdata",),
           "fp8": ("weight_scale_inv",), "fbgemm_fp8": ("weight_scale",), "eetq": ("weight_scales",), "aqlm": ("codes",)}


def otf_rows(tensors: list, method: str, qconfig: dict, metadata: dict[str, str], read_ints: Callable | None) -> list[TensorReport]:
    """`tensors`: the checkpoint's StoredTensors; returns one row per tensor or quantized module."""
    weight_parts, book = PARTS[method]
    suffixes = sorted(weight_parts + book, key=len, reverse=True)
    modules: dict[str, dict] = {}
    order: list[tuple[str, object]] = []
    for t in tensors:
        hit = next((s for s in suffixes if t.name.endswith("." + s)), None)
        if hit is None:
            order.append(("tensor", t))
            continue
        prefix = t.name[: -len(hit) - 1]
        if prefix not in modules:
            modules[prefix] = {}
            order.append(("module", prefix))
        modules[prefix][hit] = t
    rows = []
    for kind, item in order:
        if kind == "tensor":
            rows.append(_plain(item))
            continue
        parts = modules[item]  # type: ignore[index]
        if not any(m in parts for m in MARKERS[method]):  # an unquantized Linear: its weight matched "weight"
            rows += [_plain(t) for t in parts.values()]
            continue
        label, shape = _describe(method, item, parts, qconfig, metadata, read_ints)  # type: ignore[arg-type]
        stored = sum(parts[s].nbytes for s in weight_parts if s in parts)
        extra = sum(parts[s].nbytes for s in book if s in parts)
        name = f"{item}.weight"
        rows.append(TensorReport(name, layer_kind(name), label, shape, math.prod(shape), stored, extra, quantized=True))
    return rows


def _plain(t) -> TensorReport:
    return TensorReport(t.name, layer_kind(t.name), t.dtype, t.shape, math.prod(t.shape), t.nbytes)


def _describe(method: str, prefix: str, parts: dict, qconfig: dict, metadata: dict, read_ints) -> tuple[str, tuple[int, ...]]:
    w = parts.get("weight") or parts.get("_weight_qdata")
    if method == "bitsandbytes":
        state_key = next((k for k in parts if k.startswith(BNB_STATE)), None)
        if state_key is None:
            return "int8 channel (LLM.int8)", tuple(w.shape)
        qtype = state_key.rsplit("__", 1)[-1]
        dq = " dq" if "weight.nested_absmax" in parts else ""
        n = 2 * math.prod(w.shape)
        block = n // math.prod(parts["weight.absmax"].shape) if "weight.absmax" in parts else None
        shape: tuple[int, ...] = (n,)
        if read_ints is not None:  # the quant_state JSON: a few hundred bytes
            state = json.loads(bytes(read_ints(parts[state_key])).decode())
            shape, block = tuple(state["shape"]), state["blocksize"]
        return f"{qtype} g{block}{dq}", shape
    if method == "torchao":
        meta = json.loads(metadata.get(f"{prefix}.weight", "{}"))
        data = meta.get("_data") or {}
        block = data.get("block_size") or [1, w.shape[-1]]
        grid = "channel" if block[-1] == w.shape[-1] else f"g{block[-1]}"
        kind = meta.get("_type")
        if kind == "Float8Tensor":
            return f"fp8 {grid}", tuple(w.shape)
        if kind == "Int8Tensor":
            return f"int8 {grid}" + (" + int8 activations" if data.get("act_quant_kwargs") else ""), tuple(w.shape)
        bits = (data.get("target_dtype") or {}).get("_data", "int?")
        mapping = ((qconfig.get("quant_type") or {}).get("default", {}).get("_data", {}).get("mapping_type") or {}).get("_data")
        return f"{bits} {grid} {'asym' if mapping == 'ASYMMETRIC' else 'sym'}", tuple(w.shape)
    if method == "fp8":
        bs = qconfig.get("weight_block_size") or [128, 128]
        return f"fp8 {bs[0]}x{bs[1]} blocks", tuple(w.shape)
    if method == "aqlm":  # codes [out, in / in_group, M], codebooks [M, 2^B, 1, in_group]
        codes, books = parts["codes"], parts.get("codebooks")
        g = books.shape[-1] if books is not None and len(books.shape) == 4 else qconfig.get("in_group_size", 8)
        m, k = (books.shape[0], books.shape[1]) if books is not None and len(books.shape) == 4 else (codes.shape[-1], 0)
        return f"aqlm {m}x{max(k, 1).bit_length() - 1} g{g}", (codes.shape[0], codes.shape[1] * g)
    if method == "fbgemm_fp8":
        return "fp8 channel", tuple(w.shape)
    return "int8 channel", tuple(reversed(w.shape))  # eetq: [in, out]
