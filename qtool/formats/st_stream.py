"""A safetensors writer that streams: tensors are appended one at a time, so peak memory is one
tensor, whatever the model size. (`safetensors.torch.save_file` needs every tensor in memory.)

The header (which comes first in the file) is only known at the end, so data goes to a spool file
beside the output and is appended after the header on close; the extra sequential copy costs far
less than holding the model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from qtool.model.safetensors_header import TORCH_TO_ST


class StreamingSafetensorsWriter:
    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.metadata = dict(metadata or {})
        self._spool_path = path.with_name(path.name + ".data")
        self._spool = open(self._spool_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        t = t.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()
        self._spool.write(memoryview(data))
        end = self._offset + data.nbytes
        self._header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, end]}
        self._offset = end

    @property
    def nbytes(self) -> int:
        return self._offset

    def close(self) -> None:
        self._spool.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # the spec allows trailing-space padding; keeps data 8-aligned
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(spool, out, 1 << 24)
        os.unlink(self._spool_path)

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
