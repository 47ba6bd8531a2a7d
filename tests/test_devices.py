"""`--device`: an unknown string, `cuda` without CUDA, `mps` where Apple's backend is absent: one
line, exit 2, before anything is loaded (the model path here does not even exist)."""

from __future__ import annotations

import pytest
import torch

from conftest import invoke_cli
from qtool.devices import check_device
from qtool.errors import UsageError

NO_CUDA = not torch.cuda.is_available()
NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
CASES = [
    ("tpu", "expected cpu, cuda, cuda:N or mps", True),
    ("cuda:x", "expected cpu, cuda, cuda:N or mps", True),
    ("cpu:1", "expected cpu, cuda, cuda:N or mps", True),
    ("cuda", "CUDA is not available", NO_CUDA),
    ("cuda:0", "CUDA is not available", NO_CUDA),
    ("mps", "MPS backend is not available", NO_MPS),
]


@pytest.mark.parametrize("device, words, applies", CASES, ids=[c[0] for c in CASES])
def test_bad_device_is_a_usage_error(device, words, applies):
    if not applies:
        pytest.skip(f"{device} is present on this machine")
    with pytest.raises(UsageError, match=words):
        check_device(device)


def test_good_devices_are_normalised():
    assert check_device("cpu") == check_device(" CPU ") == "cpu"
    if not NO_CUDA:
        assert check_device("cuda:0") == "cuda:0"
        with pytest.raises(UsageError, match="only"):
            check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("device, words, applies", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_before_loading(command, device, words, applies, tmp_path):
    if not applies:
        pytest.skip(f"{device} is present on this machine")
    missing = tmp_path / "no-such-model"  # were anything loaded first, this would fail with exit 5
    extra = ["--dataset", str(tmp_path / "no-such.txt")] if command == "eval" else []
    r = invoke_cli(command, missing, *extra, "--device", device)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "--device" in lines[0], r.stderr


@pytest.mark.parametrize("flags, has", [("fpu sse avx2 avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                                        ("fpu sse avx2 fma", False), (None, None)])
def test_amp_note_only_where_the_cpu_lacks_bf16(flags, has, tmp_path, monkeypatch):
    """`--amp` on a CPU: a report line where /proc/cpuinfo shows no bf16 instructions; none where it
    does, on a GPU, or where the flags cannot be read."""
    from qtool import devices

    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", str(info))
    assert devices.cpu_has_bf16() is has
    note = devices.amp_note("gptq", "cpu")
    assert (note is not None) == (has is False)
    assert note is None or note.startswith("gptq: --amp on a CPU without bf16")
    assert devices.amp_note("gptq", "cuda") is None
