"""Folders in the on-the-fly families' own layouts (hqq, optimum-quanto, Quark) as sources:
tensors come back dequantized by qtool's readers (the math each format's loader test matches
against its runtime), so `qtool export` turns them into plain checkpoints and `qtool eval`
scores them where their runtime is not installed.

Reading is whole-model (these readers hold the folder's tensors in memory: hqq's weights are one
pickle, read with torch's weights-only unpickler)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qtool.model.safetensors_source import AUX_FILES, read_config
from qtool.model.source import CheckpointSource, TensorMeta


def onthefly_kind(folder: Path) -> str | None:
    """"hqq", "quanto", "quark" or None, from the files and config a folder holds."""
    from qtool.model.safetensors_header import is_hqq_folder
    from qtool.formats.quanto import is_quanto_folder
    from qtool.formats.quark import is_quark_config

    if not folder.is_dir() or not (folder / "config.json").is_file():
        return None
    if is_quanto_folder(folder):
        return "quanto"
    if is_hqq_folder(folder) and not any(folder.glob("*.safetensors")):
        return "hqq"
    if is_quark_config(read_config(folder)):
        return "quark"
    return None


def reader(kind: str):
    from qtool.formats import hqq, quanto, quark

    return {"hqq": hqq, "quanto": quanto, "quark": quark}[kind]


def dequantized_state(folder: Path, kind: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, quantized weights dequantized (to `dtype`, else their scales' dtype)."""
    from qtool.core.qweight import dequantized_state as plain_state

    state = plain_state(*reader(kind).read_quantized(folder), dtype)
    if kind == "hqq" and read_config(folder).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # hqq's file repeats the tied head (see formats/hqq.py)
    return state


class DequantizedSource(CheckpointSource):
    def __init__(self, folder: Path, kind: str) -> None:
        self.path = self.folder = folder
        self.kind = kind
        config = read_config(folder)
        self.config = {k: v for k, v in config.items() if k != "quantization_config"}
        self._state = dequantized_state(folder, kind)
        self._metas = [TensorMeta(n, tuple(t.shape), t.dtype) for n, t in self._state.items()]

    def tensors(self) -> list[TensorMeta]:
        return self._metas

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def write_aux_files(self, out_dir: Path) -> list[str]:
        written = []
        for n in AUX_FILES:
            if (self.folder / n).is_file():
                shutil.copyfile(self.folder / n, out_dir / n)
                written.append(n)
        return written

    def input_files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".pt", ".json"))

    def close(self) -> None:
        self._state.clear()
