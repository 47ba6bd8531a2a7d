"""`--device`: checked from the flag alone, before any model is loaded (exit 2 on a bad one)."""

from __future__ import annotations

import re

from qtool.errors import UsageError

_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def check_device(device: str) -> str:
    """The normalised device string; UsageError (one line) when it is unknown or not present here."""
    text = str(device).strip().lower()
    m = _DEVICE.match(text)
    if m is None or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return "cpu"
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {device!r}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise UsageError(f"--device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
        return text
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise UsageError(f"--device {device!r}: Apple's MPS backend is not available here; use --device cpu")
    return text
