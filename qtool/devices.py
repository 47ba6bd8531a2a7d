"""`--device`: checked from the flag alone, before any model is loaded (exit 2 on a bad one)."""

from __future__ import annotations

import re

from qtool.errors import UsageError

_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")
CPUINFO = "/proc/cpuinfo"


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


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 arithmetic (x86 AVX512_BF16 or AMX-BF16, read from the kernel's
    /proc/cpuinfo flags); None where that cannot be told (not Linux)."""
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))  # "bf16": arm64's Features (FEAT_BF16)


def amp_note(method: str, device: str) -> str | None:
    """The run report's line for `--amp` on a CPU where bf16 autocast is known to be slow (measured ~14x
    slower than float32 for learned rounding on a Zen 3, which has no bf16 instructions)."""
    if device != "cpu" or cpu_has_bf16() is not False:
        return None
    return (f"{method}: --amp on a CPU without bf16 instructions (no AVX512_BF16/AMX in /proc/cpuinfo): bf16 autocast is "
            "emulated there and slower than float32")
