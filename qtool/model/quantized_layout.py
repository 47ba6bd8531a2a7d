"""The quantized layouts qtool reads (GPTQ v1/v2, AWQ GEMM, AutoRound, compressed-tensors), told
from config.json alone: no torch, so `qtool inspect` stays a header read. The tensors themselves
are decoded in qtool/model/quantized_source.py."""

from __future__ import annotations

from dataclasses import dataclass

from qtool.errors import UnsupportedError

PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")  # GPTQ, AWQ, AutoRound
CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale")
READ_METHODS = ("gptq", "awq", "auto-round", "compressed-tensors")


@dataclass(frozen=True)
class Layout:
    """How one checkpoint's quantized modules are stored."""

    method: str  # quant_method: gptq | awq | auto-round | compressed-tensors
    tensors: str  # the tensor layout: "gptq" (v1, zeros - 1), "gptq_v2", "awq", "compressed-tensors"
    bits: int | None
    group_size: int | None  # -1: per channel
    symmetric: bool | None
    label: str  # for summaries, e.g. "auto-round (auto_round:auto_awq)"
    # GPTQModel `dynamic` per-module overrides, in order: ("+:pattern" or "-:pattern", {"bits": ...})
    dynamic: tuple[tuple[str, dict], ...] = ()

    def bits_for(self, module: str) -> int:
        """The width of `module`: the first `dynamic` pattern that matches its name from the
        start (GPTQModel's rule; names as the built model has them), else `bits`."""
        import re

        for key, over in self.dynamic:
            raw = key[2:] if key.startswith(("+:", "-:")) else key
            if re.match(raw, module):
                if key.startswith("-:") or not isinstance(over, dict) or "bits" not in over:
                    break
                return int(over["bits"])
        return int(self.bits or 4)


def quantization_config(config: dict) -> dict:
    q = config.get("quantization_config")
    return q if isinstance(q, dict) else {}


def layout_of(config: dict, where: str) -> Layout | None:
    """The stored layout named by config.json; None for an unquantized checkpoint."""
    q = quantization_config(config)
    method = str(q.get("quant_method") or "").lower().replace("intel/", "")
    if not method:
        return None
    bits, g = q.get("bits"), q.get("group_size")
    if method == "gptq":
        fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedError(f"{where}: GPTQ checkpoint_format {fmt!r} is not read (gptq, gptq_v2)")
        dynamic = q.get("dynamic") or {}
        if not isinstance(dynamic, dict) or not all(isinstance(k, str) for k in dynamic):
            raise UnsupportedError(f"{where}: GPTQ `dynamic` should map module patterns to overrides")
        return Layout("gptq", fmt, bits, g, q.get("sym"), f"gptq ({fmt})", tuple(dynamic.items()))
    if method == "awq":
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise UnsupportedError(f"{where}: AWQ version {version!r} is not read (only the GEMM layout)")
        return Layout("awq", "awq", bits, g, None, "awq (gemm)")
    if method == "auto-round":
        pf = str(q.get("packing_format") or "auto_round:auto_gptq")
        tensors = {"auto_round:auto_gptq": "gptq", "auto_round:auto_awq": "awq", "auto_round": "gptq_v2",
                   "auto_round:gptqmodel": "gptq_v2"}.get(pf)
        if tensors is None or str(q.get("data_type", "int")) != "int":
            raise UnsupportedError(f"{where}: auto-round packing_format {pf!r} / data_type {q.get('data_type')!r} is not read")
        mixed = [k for k, v in (q.get("extra_config") or {}).items() if int((v or {}).get("bits", 16)) < 16]
        if mixed:
            raise UnsupportedError(f"{where}: auto-round extra_config gives {mixed[0]} its own scheme; per-layer schemes are not read")
        return Layout("auto-round", tensors, bits, g, q.get("sym"), f"auto-round ({pf})")
    if method == "compressed-tensors":
        return Layout("compressed-tensors", "compressed-tensors", None, None, None, "compressed-tensors")
    raise UnsupportedError(f"{where}: quant_method {method!r} is not read; qtool reads {', '.join(READ_METHODS)}")
