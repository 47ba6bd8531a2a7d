"""Hugging Face checkpoints on local disk: a folder (single file or sharded with an index), or one
`.safetensors` file with its `config.json` beside it. Tensors are read lazily with `safe_open`
(memory-mapped), one at a time; pickle checkpoints only on request and with `weights_only=True`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from qtool.errors import FormatError
from qtool.model.safetensors_header import read_header
from qtool.model.source import CheckpointSource, TensorMeta

AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FormatError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{cfg}: not valid JSON ({e})") from None


class SafetensorsSource(CheckpointSource):
    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        self.path = path
        self.folder = path if path.is_dir() else path.parent
        self.config = read_config(self.folder)
        files = [path] if path.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = [p for g in PICKLE_GLOBS for p in self.folder.glob(g)]
            if pickles and not allow_pickle:
                raise FormatError(
                    f"{self.folder}: only pickle weights ({pickles[0].name}); pickle can run code on load, "
                    "so qtool refuses it unless you pass --allow-pickle"
                )
            if not pickles:
                raise FormatError(f"{self.folder}: no *.safetensors weights found")
        self.files = files
        self._pickles = [] if files else sorted(p for g in PICKLE_GLOBS for p in self.folder.glob(g))
        self._metas: list[TensorMeta] = []
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        for f in self.files:
            header = read_header(f)  # validates before safe_open sees the file
            for e in sorted(header.entries.values(), key=lambda e: e.begin):
                self._metas.append(TensorMeta(e.name, e.shape, e.torch_dtype))
                self._where[e.name] = f
        for p in self._pickles:
            self._load_pickle(p)

    def _load_pickle(self, p: Path) -> None:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds; one line naming the file is what helps
            raise FormatError(f"{p}: cannot load with weights_only=True: {str(e).splitlines()[0]}") from None
        for name, t in sd.items():
            self._metas.append(TensorMeta(name, tuple(t.shape), t.dtype))
            self._loaded[name] = t

    def tensors(self) -> list[TensorMeta]:
        return self._metas

    def get_tensor(self, name: str) -> torch.Tensor:
        if name in self._loaded:
            return self._loaded[name]
        f = self._where[name]
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # SafetensorError is not exported under a stable name
                raise FormatError(f"{f}: cannot open: {e}") from None
        return h.get_tensor(name)  # type: ignore[attr-defined]

    def write_aux_files(self, out_dir: Path) -> list[str]:
        written = []
        for n in AUX_FILES:
            src = self.folder / n
            if src.is_file():
                shutil.copyfile(src, out_dir / n)
                written.append(n)
        return written

    def input_files(self) -> list[Path]:
        return [*self.files, *self._pickles, self.folder / "config.json"]

    def release(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped; get_tensor's results are copies

    def close(self) -> None:
        self._handles.clear()
        self._loaded.clear()


def check_not_pickle_file(path: Path, allow_pickle: bool) -> None:
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"} and not allow_pickle:
        raise FormatError(f"{path}: pickle checkpoints can run code on load; pass --allow-pickle to read it (weights only)")
