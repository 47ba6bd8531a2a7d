"""Where a block's calibration activations live: in RAM, or memory-mapped from a file on disk when
`samples × seq_len × hidden` (times the stores alive at once) would not fit in memory.

Every sample is one float32 tensor of the same shape ([1, L, hidden]). The disk store is one
file mapped with `torch.from_file(shared=True)`: the kernel pages samples in and out, so resident
memory stays near the samples in use. The file is unlinked as soon as it is mapped (nothing is
left behind, whatever way the process ends). `QTOOL_ACTIVATIONS=ram|disk` forces a choice.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch

from qtool.errors import UsageError

STORES_ALIVE = 3  # a block's inputs, its outputs (the next inputs) and the float targets
RAM_FRACTION = 0.5  # at most this share of the available memory goes to activations


def stores_alive(method) -> int:
    """Stores of activations alive at once for a block method (class or instance): inputs and
    outputs; the float targets where it wants them. Where the targets come from the float model's
    own stream, that stream's inputs are released once the targets (its outputs) are computed, so
    three stores at most are alive then too."""
    return 2 + bool(getattr(method, "wants_targets", False))


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux /proc/meminfo; else a guess of 8 GiB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def choose_storage(n: int, shape: tuple[int, ...], stores: int = STORES_ALIVE) -> str:
    """'ram' or 'disk' for `stores` stores of `n` float32 samples of `shape`."""
    forced = os.environ.get("QTOOL_ACTIVATIONS", "").strip().lower()
    if forced in ("ram", "disk"):
        return forced
    if forced and forced != "auto":
        raise UsageError(f"QTOOL_ACTIVATIONS={forced!r}: expected ram, disk or auto")
    need = stores * n * 4 * int(torch.Size(shape).numel())
    return "ram" if need <= RAM_FRACTION * available_memory() else "disk"


class ActivationStore(Sequence[torch.Tensor]):
    """`n` float32 samples of one shape, settable and readable by index (CPU tensors)."""

    def __init__(self, n: int, shape: tuple[int, ...], where: str = "ram") -> None:
        self.n, self.shape, self.where = n, tuple(shape), where
        if where == "ram":
            self._data = torch.empty((n, *self.shape), dtype=torch.float32)
        elif where == "disk":
            fd, path = tempfile.mkstemp(prefix="qtool-activations-", suffix=".f32")
            os.close(fd)
            try:
                numel = n * int(torch.Size(self.shape).numel())
                with open(path, "r+b") as f:
                    f.truncate(numel * 4)
                self._data = torch.from_file(path, shared=True, size=numel, dtype=torch.float32).view(n, *self.shape)
            finally:
                os.unlink(path)  # the mapping keeps the pages; the name goes now
        else:
            raise ValueError(f"activation storage {where!r}")

    @classmethod
    def like(cls, other: "ActivationStore") -> "ActivationStore":
        return cls(other.n, other.shape, other.where)

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], where: str | None = None) -> "ActivationStore":
        shape = tuple(tensors[0].shape)
        store = cls(len(tensors), shape, where or choose_storage(len(tensors), shape))
        for i, t in enumerate(tensors):
            store[i] = t
        return store

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._data[j] for j in range(*i.indices(self.n))]
        return self._data[i]

    def stacked(self) -> torch.Tensor:
        """Every sample as one float32 tensor [n, *shape] (a view of the store, not a copy)."""
        return self._data

    def release(self) -> None:
        """Frees the samples now (RAM, or the mapping of the disk file), while references to the store
        may live on; it holds no samples after."""
        self.n, self._data = 0, torch.empty((0, *self.shape), dtype=torch.float32)

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.shape:
            raise ValueError(f"activation of shape {tuple(t.shape)}, the store holds {self.shape}")
        self._data[i].copy_(t.detach())
