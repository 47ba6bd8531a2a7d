"""What the writers of transformers' quantizer layouts share (bitsandbytes, torchao, fine-grained
FP8, FBGEMM FP8, EETQ): one `model.safetensors` where each quantized Linear's weight is replaced by
the tensors its quantized module holds, a `quantization_config` in config.json, and the list of
Linear layers left in full precision (a loader otherwise builds quantized modules for them too and
finds their tensors MISSING).

Reading back: each format registers a dequantizer under its `quant_method` in `DEQUANTIZERS`
({folder, config} -> plain state dict), which `qtool eval` (without the format's runtime) and
`qtool export` use, and which the consumer tests hold equal to the runtime's own weights.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Callable

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.formats.base import FormatWriter, write_folder_files
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource

WEIGHTS_FILE = "model.safetensors"
# quant_method -> (folder, config) -> {tensor name: dequantized / plain tensor}; filled by the format modules
DEQUANTIZERS: dict[str, Callable[[Path, dict], dict[str, torch.Tensor]]] = {}


def module_name(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


class HFQuantizedWriter(FormatWriter):
    """Base of the transformers-quantizer layouts: subclasses say how one module is packed
    (`pack`) and what the config says (`quantization_config`)."""

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.dtype_name = _dtype_name(source)
        self.linears = [module_name(t.name) for t in source.tensors() if t.name.endswith(".weight") and len(t.shape) == 2]
        self.quantized: list[str] = []
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})

    @abstractmethod
    def pack(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """One quantized module's tensors, by full name."""

    @abstractmethod
    def quantization_config(self) -> dict:
        """config.json's `quantization_config`."""

    def file_metadata(self) -> dict[str, str]:
        """Extra `__metadata__` entries of the safetensors file (torchao describes its tensors there)."""
        return {}

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        prefix = module_name(name)
        for key, t in self.pack(prefix, qw).items():
            self.st.add(key, t)
        self.quantized.append(prefix)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def not_converted(self) -> list[str]:
        """Linear-shaped modules left in full precision, lm_head always among them (tied or not)."""
        done = set(self.quantized)
        keep = [m for m in self.linears if m not in done and "embed" not in m.rsplit(".", 1)[-1]]
        if "lm_head" not in done and "lm_head" not in keep:
            keep.append("lm_head")
        return keep

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata.update(self.file_metadata())
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        write_folder_files(self.out, self.source, {**config, "quantization_config": self.quantization_config()}, provenance)

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()


def _dtype_name(source: CheckpointSource) -> str:
    """The checkpoint's float dtype as transformers spells it ("bfloat16"), from its largest weights."""
    floats = [t for t in source.tensors() if t.dtype.is_floating_point and len(t.shape) == 2]
    dtype = max(floats, key=lambda t: t.numel).dtype if floats else torch.float32
    return str(dtype).removeprefix("torch.")


def load_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a folder's safetensors files, and their merged `__metadata__`."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            metadata.update(h.metadata() or {})
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors, metadata


def group_modules(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a state dict into {module: {suffix: tensor}} for names ending in one of `suffixes`
    (longest first), and the rest."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    ordered = sorted(suffixes, key=len, reverse=True)
    for name, t in tensors.items():
        hit = next((s for s in ordered if name.endswith("." + s)), None)
        if hit is None:
            rest[name] = t
        else:
            modules.setdefault(name[: -len(hit) - 1], {})[hit] = t
    return modules, rest


def register_reader(method: str, read: Callable[[Path, dict], tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]]) -> None:
    """Register a format's reader ({module: QuantizedWeight}, {name: other tensor}) as the
    dequantizer of its `quant_method`."""

    def dequantize(folder: Path, config: dict) -> dict[str, torch.Tensor]:
        qws, rest = read(folder, config)
        return {**rest, **{f"{p}.weight": qw.dequantize(torch.float32) for p, qw in qws.items()}}

    DEQUANTIZERS[method] = dequantize


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A folder in one of these layouts -> plain state dict, through its registered dequantizer."""
    from qtool.errors import UnsupportedError

    config = json.loads((folder / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in DEQUANTIZERS:
        raise UnsupportedError(f"{folder}: quant_method {method!r}: qtool reads {', '.join(sorted(DEQUANTIZERS))}")
    state = DEQUANTIZERS[method](folder, config)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
