"""Plain (unquantized) Hugging Face folder: `model.safetensors` + config + tokenizer.

`qtool export model.gguf -f safetensors` uses it to turn a GGUF back into a checkpoint that
transformers loads; any source works (a GGUF's tensors arrive dequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, write_folder_files
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource


@FORMATS.register("safetensors", aliases=("hf", "st"))
class SafetensorsWriter(FormatWriter):
    """Unquantized safetensors folder, in the source's (or the requested) dtype."""

    quantizes = False

    def __init__(self, dtype: torch.dtype | None = None, **options: object) -> None:
        super().__init__(**options)
        self.dtype = dtype

    def check_recipe(self, recipe: QuantRecipe) -> None:
        from qtool.errors import UnsupportedError

        raise UnsupportedError("--format safetensors writes unquantized weights; use it with `qtool export`")

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source = out, source
        self.st = StreamingSafetensorsWriter(out / "model.safetensors", {"format": "pt"})

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        self.add_tensor(name, qw.dequantize(self.dtype))

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        self.st.add(name, t)

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        config = dict(config)
        config.pop("quantization_config", None)
        if self.dtype is not None:
            config["torch_dtype"] = config["dtype"] = str(self.dtype).removeprefix("torch.")
        write_folder_files(self.out, self.source, config, provenance)

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()
