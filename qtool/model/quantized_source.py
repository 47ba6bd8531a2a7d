"""Quantized safetensors checkpoints read back as QuantizedWeights: GPTQ (v1 and v2), AWQ GEMM,
AutoRound's native format (`auto_round:auto_gptq` = GPTQ v1 tensors, `auto_round:auto_awq` = AWQ
tensors, `auto_round` = GPTQ tensors with zero points as stored) and compressed-tensors.

`QuantizedSource` wraps a SafetensorsSource: `tensors()` lists each quantized module as one
`prefix.weight` of its logical shape (the packed parts hidden), `get_tensor()` dequantizes it with
qtool's reference math (`QuantizedWeight.dequantize`), and `quantized()` returns the stored codes
themselves, for lossless repacks (`qtool export QUANTIZED -f OTHER`, qtool/convert.py). The layout
of each module is decided from config.json and headers alone, so refusals come before any read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.core.qweight import QuantizedWeight
from qtool.errors import FormatError, UnsupportedError
from qtool.model.safetensors_source import SafetensorsSource
from qtool.model.source import CheckpointSource, TensorMeta

from qtool.model.quantized_layout import CT_PARTS, PACKED_PARTS, READ_METHODS, Layout, layout_of, quantization_config  # noqa: E402,F401


def unpack_module(parts: dict[str, torch.Tensor], layout: Layout, qconfig: dict, prefix: str) -> QuantizedWeight:
    """The stored parts of one module -> QuantizedWeight, in the layout's convention."""
    if layout.tensors == "compressed-tensors":
        from qtool.formats.compressed_tensors import scheme_for, unpack_module as unpack_ct

        args = scheme_for(prefix, qconfig)
        if args is None:
            raise FormatError(f"module {prefix} has quantized tensors but no config group targets it")
        return unpack_ct(parts, args)
    if layout.tensors == "awq":
        from qtool.formats.awq import unpack_awq

        return unpack_awq(parts, int(layout.bits or 4), int(layout.group_size or -1))
    from qtool.formats.gptq import unpack_gptq

    bits, g = layout.bits_for(prefix), int(layout.group_size or -1)
    if "g_idx" not in parts:  # AutoRound's GPTQ tensors carry no group map: contiguous groups
        in_f = parts["qweight"].shape[0] * 32 // bits
        parts = {**parts, "g_idx": torch.arange(in_f, dtype=torch.int32) // (in_f if g == -1 else g)}
    qw = unpack_gptq(parts, bits, layout.tensors, g)
    if qw.zero_point is not None and layout.symmetric and not qw.zero_point.any():
        qw.zero_point = None
    return qw


class QuantizedSource(CheckpointSource):
    """A quantized safetensors folder, read module by module (see the module docstring)."""

    def __init__(self, inner: SafetensorsSource, layout: Layout) -> None:
        self.inner, self.layout = inner, layout
        self.path, self.config = inner.path, inner.config
        self.qconfig = quantization_config(inner.config)
        self.dtype = _model_dtype(inner.config)
        parts_of = PACKED_PARTS if layout.tensors != "compressed-tensors" else CT_PARTS
        self.parts: dict[str, dict[str, str]] = {}  # module -> {suffix: tensor name}
        metas: list[TensorMeta | str] = []  # a str: the synthetic `prefix.weight` of a quantized module
        by_name = {m.name: m for m in inner.tensors()}
        for m in inner.tensors():
            prefix, _, suffix = m.name.rpartition(".")
            ct_float = layout.tensors == "compressed-tensors" and suffix == "weight" and f"{prefix}.weight_scale" in by_name
            if suffix in parts_of or ct_float:
                if prefix not in self.parts:
                    self.parts[prefix] = {}
                    metas.append(prefix)
                self.parts[prefix][suffix] = m.name
            else:
                metas.append(m)
        self._metas = [m if isinstance(m, TensorMeta) else TensorMeta(f"{m}.weight", self._shape(m, by_name), self.dtype)
                       for m in metas]

    def _shape(self, prefix: str, by_name: dict[str, TensorMeta]) -> tuple[int, int]:
        p = {s: by_name[n] for s, n in self.parts[prefix].items()}
        if self.layout.tensors == "compressed-tensors":
            if "weight_shape" in p:
                return tuple(int(v) for v in self.inner.get_tensor(self.parts[prefix]["weight_shape"]).tolist())  # type: ignore[return-value]
            if "weight" in p:
                return p["weight"].shape  # type: ignore[return-value]
            raise FormatError(f"{self.path}: {prefix}: compressed-tensors module without weight_shape")
        if not {"qweight", "scales"} <= set(p):
            raise FormatError(f"{self.path}: {prefix}: has {', '.join(sorted(p))} but not qweight and scales")
        out_f = p["scales"].shape[1]
        if self.layout.tensors == "awq":
            return (out_f, p["qweight"].shape[0])
        in_f = p["g_idx"].shape[0] if "g_idx" in p else p["qweight"].shape[0] * 32 // self.layout.bits_for(prefix)
        return (out_f, in_f)

    def tensors(self) -> list[TensorMeta]:
        return self._metas

    def quantized_modules(self) -> list[str]:
        return list(self.parts)

    def quantized(self, name: str) -> QuantizedWeight:
        """The stored codes of `prefix.weight` (or `prefix`), unpacked; scales as stored."""
        prefix = name[: -len(".weight")] if name.endswith(".weight") else name
        parts = {s: self.inner.get_tensor(n) for s, n in self.parts[prefix].items()}
        try:
            return unpack_module(parts, self.layout, self.qconfig, prefix)
        except (FormatError, UnsupportedError) as e:
            raise type(e)(f"{self.path}: {prefix}: {e}") from None

    def get_tensor(self, name: str) -> torch.Tensor:
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in self.parts:
            return self.quantized(prefix).dequantize(self.dtype)
        return self.inner.get_tensor(name)

    def write_aux_files(self, out_dir: Path) -> list[str]:
        return self.inner.write_aux_files(out_dir)

    def input_files(self) -> list[Path]:
        return self.inner.input_files()

    def release(self) -> None:
        self.inner.release()

    def close(self) -> None:
        self.inner.close()


def _model_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return {"float16": torch.float16, "float32": torch.float32}.get(name, torch.bfloat16)


def open_quantized(source: CheckpointSource) -> CheckpointSource:
    """`source` as a QuantizedSource when its config names a quantization qtool reads; unchanged
    when it is not quantized; UnsupportedError naming the method otherwise."""
    if not isinstance(source, SafetensorsSource):
        return source
    layout = layout_of(source.config, str(source.path))
    return source if layout is None else QuantizedSource(source, layout)


def read_quantized(folder: Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A quantized folder -> ({module: QuantizedWeight}, {name: other tensor}), for tests and eval."""
    src = open_quantized(SafetensorsSource(Path(folder)))
    if not isinstance(src, QuantizedSource):
        raise FormatError(f"{folder}: config.json names no quantization")
    with src:
        qws = {p: src.quantized(p) for p in src.quantized_modules()}
        synthetic = {f"{p}.weight" for p in src.parts}
        rest = {m.name: src.inner.get_tensor(m.name) for m in src.tensors() if m.name not in synthetic}
    return qws, rest


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A quantized folder -> plain state dict, dequantized with qtool's reference math."""
    qws, rest = read_quantized(folder)
    state = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in rest.items()}
    for prefix, qw in qws.items():
        state[f"{prefix}.weight"] = qw.dequantize(dtype)
    return state
