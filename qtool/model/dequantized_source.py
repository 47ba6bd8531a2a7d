"""A checkpoint in one of transformers' quantizer layouts that qtool reads (bitsandbytes, torchao,
fine-grained FP8, FBGEMM FP8, EETQ, AQLM: qtool/formats/hf_quantized.py), presented dequantized: its
weights as plain tensors in the checkpoint's dtype (or the one asked for), its config without `quantization_config`.
`qtool export` turns such a folder into plain safetensors (or GGUF) through it. The whole model
is dequantized once, in memory (these layouts are read whole by their loaders too)."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.model.safetensors_source import SafetensorsSource
from qtool.model.source import TensorMeta


def dequantizable(config: dict) -> bool:
    from qtool.formats.hf_quantized import DEQUANTIZERS

    return (config.get("quantization_config") or {}).get("quant_method") in DEQUANTIZERS


class DequantizedSource(SafetensorsSource):
    def __init__(self, path: Path, dtype: torch.dtype | None = None) -> None:
        from qtool.formats.hf_quantized import read_dequantized

        super().__init__(path)
        self.method = str((self.config.get("quantization_config") or {}).get("quant_method"))
        dtype = dtype or getattr(torch, str(self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
        self._state = read_dequantized(self.folder, dtype)
        self.config = {k: v for k, v in self.config.items() if k != "quantization_config"}
        self._metas = [TensorMeta(n, tuple(t.shape), t.dtype) for n, t in self._state.items()]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        super().close()
        self._state.clear()
