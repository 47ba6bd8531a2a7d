"""A checkpoint opened for lazy, tensor-at-a-time reading, whatever it is on disk.

Every source speaks Hugging Face: tensor names are the `transformers` state-dict names and
`config` is the `config.json` dict, so the pipeline, the writers and `inspect` never care whether
the weights came from a safetensors folder, a Hub snapshot or a GGUF file.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
import torch


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype that get_tensor() returns

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# `model.layers.3.mlp.up_proj.weight` -> block "model.layers.3"; also gpt2's `transformer.h.3.` and
# opt's `model.decoder.layers.3.`.
BLOCK_RE = re.compile(r"^(?P<block>(?:.*\.)?(?:layers|h|blocks|block)\.(?P<index>\d+))\.")


def block_of(name: str) -> str | None:
    m = BLOCK_RE.match(name)
    return m.group("block") if m else None


class CheckpointSource(ABC):
    """Lazy reader. Subclasses: SafetensorsSource (folder / file / Hub snapshot), GGUFSource."""

    path: Path
    config: dict

    @abstractmethod
    def tensors(self) -> list[TensorMeta]:
        """Every tensor, in file order, with HF names."""

    @abstractmethod
    def get_tensor(self, name: str) -> torch.Tensor:
        """Read (and for GGUF dequantize) one tensor. Only this tensor is brought into memory."""

    @abstractmethod
    def write_aux_files(self, out_dir: Path) -> list[str]:
        """Write what a loader needs beside the weights other than config.json (tokenizer files,
        generation_config.json, chat template...). Returns the file names written."""

    def input_files(self) -> list[Path]:
        """Files whose hashes identify this input in the output's provenance record."""
        return [self.path] if self.path.is_file() else []

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def release(self) -> None:  # noqa: B027 - optional hook
        """Drop cached file mappings between blocks. Pages of a memory-mapped file that were read
        count in the process RSS until unmapped; releasing per block keeps peak RSS near one block."""

    # -- conveniences shared by all sources --------------------------------------------------
    def meta(self, name: str) -> TensorMeta:
        for t in self.tensors():
            if t.name == name:
                return t
        raise KeyError(name)

    trust_remote_code: bool = False  # may the architecture's custom code (auto_map) run?

    @property
    def structure(self):
        """The architecture as transformers builds it (qtool/model/structure.py), found from the
        config and the tensor headers on first use; refuses what qtool cannot quantize."""
        if getattr(self, "_structure", None) is None:
            from qtool.model.structure import discover

            folder = self.path if self.path.is_dir() else self.path.parent
            self._structure = discover(self.config, {t.name: t.shape for t in self.tensors()}, folder=folder,
                                       trust_remote_code=self.trust_remote_code, where=str(self.path))
        return self._structure

    def block_of(self, name: str) -> str | None:
        """The decoder block of a tensor: from the architecture once it is known (a vision tower's
        `encoder.layers.N` is no decoder block), else from the name."""
        s = getattr(self, "_structure", None)
        return s.block_of(name) if s is not None else block_of(name)

    def blocks(self) -> list[str]:
        """Decoder block prefixes in index order."""
        if getattr(self, "_structure", None) is not None:
            return self._structure.block_prefixes()
        seen: dict[str, int] = {}
        for t in self.tensors():
            m = BLOCK_RE.match(t.name)
            if m:
                seen.setdefault(m.group("block"), int(m.group("index")))
        return sorted(seen, key=seen.__getitem__)

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
