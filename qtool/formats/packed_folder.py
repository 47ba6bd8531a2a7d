"""What the int32-packed folder writers (AWQ, auto-round) share: one streamed `model.safetensors`
with fp16 scales, one group size per model (their configs hold one), and the folder's
config.json / aux files / qtool.json at the end. Each writer packs its own tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool import __version__
from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats.base import FormatWriter
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource

WEIGHTS_FILE = "model.safetensors"


class PackedFolderWriter(FormatWriter):
    qtype_kinds = ("int",)
    partial_groups = False
    info_key = "packed"  # the section of qtool.json that records this writer's storage facts
    extra_config_files: tuple[str, ...] = ()  # files beside config.json that repeat quantization_config

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source, self.recipe = out, source, recipe
        self.linears = [t.name[: -len(".weight")] for t in source.tensors() if t.name.endswith(".weight") and len(t.shape) == 2]
        self.quantized: set[str] = set()
        self.group_size: int | None = None
        self.inexact_scales = 0
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})

    def planned_shapes(self, source: CheckpointSource) -> dict[str, tuple[int, ...]]:
        """{module: [out, in]} of the layers check_plan was given, for begin()'s width checks."""
        shapes = {t.name[: -len(".weight")]: t.shape for t in source.tensors() if t.name.endswith(".weight")}
        return {m: shapes[m] for m in sorted(getattr(self, "planned", set()))}

    def check_group(self, prefix: str, qw: QuantizedWeight) -> None:
        g = qw.group_size if qw.strategy == "group" else -1
        if self.group_size is not None and g != self.group_size:
            raise UnsupportedError(f"{prefix}: --format {self.registry_name} holds one group size per model "
                                   f"({self.group_size}), this layer has {g}")
        self.group_size = g

    def add_packed(self, prefix: str, qw: QuantizedWeight, tensors: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(tensors["scales"]).all():
            raise UnsupportedError(f"{prefix}: a scale overflows float16, which --format {self.registry_name} stores")
        self.inexact_scales += int((tensors["scales"].to(qw.scale.dtype) != qw.scale.cpu().t()).sum())
        for suffix, t in tensors.items():
            self.st.add(f"{prefix}.{suffix}", t)
        self.quantized.add(prefix)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def quantization_config(self) -> dict:
        raise NotImplementedError

    def info(self) -> dict:
        return {"scales_dtype": "float16", "inexact_fp16_scales": self.inexact_scales}

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        qcfg = self.quantization_config()
        (self.out / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}, indent=2) + "\n")
        for name in self.extra_config_files:
            (self.out / name).write_text(json.dumps(qcfg, indent=2) + "\n")
        self.source.write_aux_files(self.out)
        record = {"qtool_version": __version__, **provenance, self.info_key: self.info()}
        (self.out / "qtool.json").write_text(json.dumps(record, indent=2) + "\n")

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()
