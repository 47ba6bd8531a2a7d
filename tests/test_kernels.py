"""Every kernel backend against its pure-torch reference (qtool/kernels).

Dequantization is deterministic elementwise math: backends must match the reference bit for bit.
A linear's backends sum in another order (and ATen's CPU kernel folds the zero point into a
float offset), so those are compared within a stated tolerance. The CUDA tests run where a CUDA
GPU is present and are skipped with the reason otherwise; the Triton kernels also run on CPU
under Triton's interpreter (TRITON_INTERPRET=1) where triton is installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qtool import kernels
from qtool.core.affine import quantize_int
from qtool.errors import UnsupportedError
from qtool.kernels import cpu as cpu_backend
from qtool.kernels.int4 import Int4Weight, dequantize_reference, linear_reference, unpack_codes
from qtool.qtypes import get_qtype

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here: the Triton backend is checked where one is present")


def qweight(out: int = 48, cols: int = 256, group: int | None = 128, asym: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    strategy = "group" if group else "channel"
    return quantize_int(w, get_qtype("int4"), strategy=strategy, group_size=group, symmetric=not asym)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_reference_qlinear_equals_dense_matmul_on_dequantized_weight(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(3, 64, generator=g).to(dtype)
    qw = quantize_int(w, get_qtype("int4"), strategy="group", group_size=32)
    y = kernels.get("qlinear")(x, qw)
    assert torch.equal(y, x @ qw.dequantize(torch.float32).to(dtype).T)


def test_unknown_op_names_the_available_ones():
    with pytest.raises(KeyError, match="qlinear"):
        kernels.get("nope")


# -- the packed layout and its reference --------------------------------------------------------


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128, None], ids=["g32", "g128", "channel"])
def test_packed_reference_is_the_quantized_weights_own_dequantization(asym, group):
    qw = qweight(group=group, asym=asym)
    w = Int4Weight.from_qweight(qw)
    assert torch.equal(unpack_codes(w), qw.codes)
    assert torch.equal(dequantize_reference(w), qw.dequantize(torch.float32))  # exact: the same float32 math
    assert w.nbytes() < qw.dequantize(torch.float32).numel()  # under a byte per weight, scales included
    x = torch.randn(5, qw.shape[1])
    assert torch.equal(linear_reference(x, w), kernels.get("qlinear")(x, qw))


def test_layouts_the_kernels_cannot_take_are_refused():
    with pytest.raises(UnsupportedError, match="int4"):
        Int4Weight.from_qweight(quantize_int(torch.randn(8, 64), get_qtype("int8"), strategy="group", group_size=32))
    with pytest.raises(UnsupportedError, match="group size"):
        Int4Weight.from_qweight(quantize_int(torch.randn(8, 60), get_qtype("int4"), strategy="group", group_size=20))


def test_forcing_the_reference(monkeypatch):
    monkeypatch.setenv("QTOOL_KERNELS", "reference")
    assert kernels.get("int4_linear", "cpu") is linear_reference
    assert kernels.backend_for("int4_linear", "cuda") is None


# -- CPU backend: ATen's W4 kernel ----------------------------------------------------------------


@pytest.mark.skipif(not cpu_backend.available(), reason="this torch has no _weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("dtype, rows, tol", [(torch.float32, 1, 1e-4), (torch.float32, 16, 1e-4),
                                              (torch.bfloat16, 1, 2e-2), (torch.bfloat16, 64, 2e-2)],
                         ids=["f32-1", "f32-16", "bf16-1", "bf16-64"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_cpu_backend_matches_the_reference(dtype, rows, tol, asym):
    qw = qweight(out=64, cols=512, group=128, asym=asym, seed=1)
    w = Int4Weight.from_qweight(qw)
    x = torch.randn(rows, 512).to(dtype)
    bias = torch.randn(64)
    assert cpu_backend.supports(x, w)
    got = cpu_backend.linear(x, w, bias).float()
    want = linear_reference(x.float(), w, bias)  # float32 reference: the backend's error alone
    # tolerance relative to the output's scale: float32 ~1e-6 reassociation (bound 1e-4); bf16
    # activations round x, the scales and the float offset to 8 bits (bound 2e-2)
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert kernels.call("int4_linear", x, w, bias).dtype == dtype


def test_cpu_dispatch_keeps_large_float32_batches_on_the_reference():
    w = Int4Weight.from_qweight(qweight(out=16, cols=256))
    x = torch.randn(cpu_backend.FP32_MAX_ROWS + 1, 256)
    assert not cpu_backend.supports(x, w)
    assert torch.equal(kernels.call("int4_linear", x, w), linear_reference(x, w))


# -- CUDA backend: Triton ------------------------------------------------------------------------


def _cuda_cases():
    for asym in (False, True):
        for group in (32, 128):
            yield asym, group


@needs_cuda
@pytest.mark.parametrize("asym, group", list(_cuda_cases()), ids=lambda v: str(v))
def test_triton_dequantize_is_bit_identical(asym, group):
    from qtool.kernels import cuda

    w = Int4Weight.from_qweight(qweight(out=200, cols=1024, group=group, asym=asym, seed=2)).to("cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(cuda.dequantize(w, dtype), dequantize_reference(w, dtype))


@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 200], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_triton_linear_matches_the_reference(rows, dtype, asym):
    from qtool.kernels import cuda

    w = Int4Weight.from_qweight(qweight(out=300, cols=1024, group=128, asym=asym, seed=3)).to("cuda")
    x = torch.randn(rows, 1024, device="cuda").to(dtype)
    bias = torch.randn(300, device="cuda")
    got = cuda.linear(x, w, bias)
    assert got.dtype == dtype
    # the reference on the same rounded inputs, summed in float64: the kernel's own error alone.
    # Each dequantized element is the reference's; float32 accumulation over 1024 terms (bound
    # 1e-4 of the output scale), plus the output's rounding to 16 bits (8e-3 bf16, 1e-3 f16)
    want = torch.nn.functional.linear(x.double(), dequantize_reference(w, dtype).double(), bias.to(dtype).double())
    tol = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(kernels.call("int4_linear", x, w, bias), got)  # the dispatcher picks it


_INTERPRETED = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_kernels import qweight
from qtool.kernels import cuda
from qtool.kernels.int4 import Int4Weight, dequantize_reference
assert type(cuda._row_tile).__name__ == "InterpretedFunction", type(cuda._row_tile)  # not compiled for a GPU
rows, asym = {rows}, {asym}
w = Int4Weight.from_qweight(qweight(out=40, cols=256, group=32, asym=asym, seed=4))
assert torch.equal(cuda.dequantize(w, torch.float32), dequantize_reference(w))
x = torch.randn(rows, 256)
want = torch.nn.functional.linear(x.double(), dequantize_reference(w).double())
err = (cuda.linear(x, w).double() - want).abs().max().item()
assert err <= 1e-4 * want.abs().max().item(), err
print("ok", err)
"""


# triton is a test dependency (pyproject [test]); without it (not Linux) there is no Triton code to run
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e '.[test]' installs it on Linux)")
@pytest.mark.parametrize("rows", [1, 20], ids=["gemv", "gemm"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_triton_kernels_under_the_interpreter(rows, asym):
    """The Triton kernels themselves (both linear paths and dequantize) on the CPU, under Triton's
    interpreter: the same kernel source the CUDA backend compiles, run element by element with
    numpy. A process of its own, since TRITON_INTERPRET is read when the kernels are defined."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED.format(tests=str(tests), rows=rows, asym=asym)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
