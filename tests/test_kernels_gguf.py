"""The GGUF block ops' C backend (qtool/kernels/_ggml_blocks.c via ggml_cpu.py) against their torch
reference (qtool/formats/gguf/quants.py, itself byte-identical to llama.cpp: tests/test_gguf_quants.py).

No tolerance on bytes: every type the backend takes, on Gaussian rows with the edge-case blocks of
test_gguf_quants (zeros, ties, fp16-subnormal and overflowing scales, float32 subnormals, NaN/inf rows)
and on SmolLM2's weights; and every importance-matrix type with an importance matrix, on adversarial
rows and importance vectors (zeros, tiny, subnormal, huge and overflowing values) at several row
lengths. Dequantization is bit-equal to gguf-py's. Also: the dispatch (an importance matrix goes to the
C backend, a mis-sized or non-finite one and QTOOL_KERNELS=reference to the reference), the error sums,
and setup.py's optional build (a failed compile still builds the package, without the extension).

The backend under test is the package's built extension; where it was not built (an install without
a compiler), the fixture compiles the same C file with the flags setup.py uses, so this comparison
runs wherever a C compiler exists and is skipped, with the reason, only where none does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from qtool import kernels
from qtool.formats.gguf import quants as Q
from qtool.formats.gguf.quants import IMATRIX_SUPPORTED, quantize_tensor
from qtool.kernels import ggml_cpu
from test_gguf_quants import _edge_data, _imatrix

REPO = Path(__file__).resolve().parents[1]
C_FILE = REPO / "qtool" / "kernels" / "_ggml_blocks.c"
TYPES = [T(t) for t in sorted(ggml_cpu.TYPES)]
IM_TYPES = [t for t in TYPES if t in IMATRIX_SUPPORTED]
ids = lambda q: q.name  # noqa: E731
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi", "-fPIC", "-shared"]  # as setup.py


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module", params=["dispatch", "scalar"])
def backend(request, tmp_path_factory):
    """The C library: the package's build (else one compiled here), whose K-type searches run 8
    sub-blocks per AVX2 instruction where the CPU has AVX2 ("dispatch"); and the same file compiled
    scalar-only ("scalar", the path of CPUs without AVX2 and of non-x86 machines)."""
    ggml_cpu._load.cache_clear()
    if request.param == "dispatch" and ggml_cpu.library() is not None and "QTOOL_GGML_BLOCKS_LIB" not in os.environ:
        yield ggml_cpu
        return
    cc = _compiler()
    if cc is None:
        pytest.skip("the C extension is not built and no C compiler is available to build it")
    lib = tmp_path_factory.mktemp("ggml_blocks") / f"lib_ggml_blocks_{request.param}.so"
    extra = ["-DQTOOL_SCALAR_ONLY"] if request.param == "scalar" else []
    subprocess.run([cc, *FLAGS, *extra, "-o", str(lib), str(C_FILE), "-lm"], check=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("QTOOL_GGML_BLOCKS_LIB", str(lib))
    ggml_cpu._load.cache_clear()
    assert ggml_cpu.available()
    yield ggml_cpu
    mp.undo()
    ggml_cpu._load.cache_clear()


def _blocks_differing(a: np.ndarray, b: np.ndarray, qtype: T) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    ts = GGML_QUANT_SIZES[qtype][1]
    return int((a.reshape(-1, ts) != b.reshape(-1, ts)).any(1).sum())


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_c_backend_byte_equal_to_reference(backend, qtype):
    x = torch.from_numpy(_edge_data(40, 3072, seed=7, extreme=True))
    x[20, 100] = float("nan")      # non-finite rows: the reference's bytes (the backend hands them over)
    x[21, 5] = float("inf")
    x[22, 3000] = float("-inf")
    ref = quantize_tensor(x, qtype)
    for threads in ("1", "3"):     # row splits must not matter
        os.environ["QTOOL_GGUF_THREADS"] = threads
        try:
            got = backend.quantize(x, qtype)
        finally:
            del os.environ["QTOOL_GGUF_THREADS"]
        assert _blocks_differing(got, ref, qtype) == 0, threads
    xb = x[:20].to(torch.bfloat16)  # bf16 input is computed in float32 by both
    assert _blocks_differing(backend.quantize(xb, qtype), quantize_tensor(xb, qtype), qtype) == 0


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_c_backend_on_more_random_scales(backend, qtype):
    """Many Gaussian blocks at scales from 1e-7 to 1e4 (the K-types' searches take many paths)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, 1024, generator=g) * torch.logspace(-7, 4, 256)[:, None]
    x[::7] += 0.3  # offset blocks: min > 0 paths
    assert _blocks_differing(backend.quantize(x, qtype), quantize_tensor(x, qtype), qtype) == 0


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_c_dequantize_bit_equal_to_gguf_py(backend, qtype):
    x = torch.from_numpy(_edge_data(24, 2048, seed=9))
    data = quantize_tensor(x, qtype)
    ours = backend.dequantize(data, qtype)
    ref = np.asarray(gq.dequantize(data, qtype), dtype=np.float32)
    assert ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def _adversarial_rows(cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows at scales 1e-8..1e6 and rows built to hit the importance paths' corners: all zero,
    zero but one outlier, one huge outlier (its square overflows the row's sigma2 to inf), all positive
    (min > 0), many zeros, float32 subnormals, rows whose squares overflow, signed zeros (the stored
    min's sign), rounding ties, constant blocks, heavy tails."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, cols)).astype(np.float32)
    x *= (10.0 ** np.linspace(-8, 6, 24, dtype=np.float32))[rng.permutation(24)][:, None]
    x[0] = 0.0
    x[1] = 0.0
    x[1, cols // 3] = 1e4
    x[2, 7] = 1e30
    x[3] = np.abs(x[3]) + 1.0
    x[4, ::3] = 0.0
    x[5] = rng.standard_normal(cols) * 1e-39
    x[6] = rng.standard_normal(cols) * 1e17
    x[7] = np.where(rng.random(cols) < 0.5, 0.0, -0.0)
    x[8] = np.abs(rng.standard_normal(cols))
    x[8, ::5] = 0.0
    x[8, 2::7] = -0.0
    x[9] = np.round(rng.standard_normal(cols) * 4) / 4
    x[10] = np.repeat(rng.standard_normal(cols // 32), 32)
    x[11] = rng.standard_t(2, cols)
    return torch.from_numpy(x)


def _adversarial_imatrices(cols: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = _imatrix(cols, seed)                                   # 1e-3..10, dead columns
    some_zero = base.copy()
    some_zero[rng.random(cols) < 0.3] = 0.0
    mixed = (10.0 ** rng.uniform(-38, 38, cols)).astype(np.float32)
    mixed[rng.random(cols) < 0.2] = 0.0
    return {   # huge ones overflow the weights and the searches' sums: inf and NaN scales, NaN fp16 d
        "random": base, "some zero": some_zero, "all zero": np.zeros(cols, np.float32),
        "tiny": base * np.float32(1e-30), "subnormal": (np.float32(1e-42) * rng.integers(0, 5, cols)).astype(np.float32),
        "huge": base * np.float32(1e30), "float max": np.full(cols, 3e38, np.float32), "mixed": mixed,
    }


def _reference_must_not_run(monkeypatch):
    """The reference raises if called: the C backend must take the whole call (no fallback)."""
    def refuse(*a, **k):
        raise AssertionError("the torch reference ran: the C backend did not take this call")
    monkeypatch.setattr(Q, "quantize_tensor", refuse)


@pytest.mark.parametrize("qtype", IM_TYPES, ids=ids)
def test_c_backend_with_imatrix_byte_equal_to_reference(backend, qtype, monkeypatch):
    """llama.cpp's quantize_row_*_impl in C: the reference's bytes for every importance vector, on rows
    of whole super-blocks and (legacy types) of block counts that leave the AVX2 build a scalar tail."""
    bs = GGML_QUANT_SIZES[qtype][0]
    for cols in ((96, 416, 2336) if bs == 32 else (256, 2304)):
        x = _adversarial_rows(cols, seed=cols)
        for name, im in _adversarial_imatrices(cols, seed=cols + 1).items():
            im = torch.from_numpy(im)
            ref = quantize_tensor(x, qtype, im)
            assert backend.supports_quantize(x, qtype, im)
            with monkeypatch.context() as mp:
                _reference_must_not_run(mp)
                got = backend.quantize(x, qtype, im)
            assert _blocks_differing(got, ref, qtype) == 0, (cols, name)
    xb = x[:12].to(torch.bfloat16)      # bf16 input is computed in float32 by both
    assert _blocks_differing(backend.quantize(xb, qtype, im), quantize_tensor(xb, qtype, im), qtype) == 0


@pytest.mark.parametrize("qtype", IM_TYPES, ids=ids)
def test_c_backend_with_imatrix_on_edge_data_threads_and_nonfinite_rows(backend, qtype):
    """test_gguf_quants' edge-case rows (held to llama.cpp there) with NaN/inf rows, which go to the
    reference with the importance matrix; row splits over threads must not matter."""
    x = torch.from_numpy(_edge_data(40, 3072, seed=7, extreme=True))
    x[20, 100] = float("nan")
    x[21, 5] = float("inf")
    x[22, 3000] = float("-inf")
    x[23] = float("nan")
    im = torch.from_numpy(_imatrix(3072, seed=3))
    ref = quantize_tensor(x, qtype, im)
    for threads in ("1", "3"):
        os.environ["QTOOL_GGUF_THREADS"] = threads
        try:
            got = backend.quantize(x, qtype, im)
        finally:
            del os.environ["QTOOL_GGUF_THREADS"]
        assert _blocks_differing(got, ref, qtype) == 0, threads


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.Q4_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q6_K], ids=ids)
def test_error_sums_match_the_reference(backend, qtype, use_imatrix):
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    im = torch.from_numpy(_imatrix(1024, seed=4)) if use_imatrix else None
    assert backend.supports_quantize(x, qtype, im)
    data, (sig, noise) = backend.quantize_with_error(x, qtype, im)
    rdata, (rsig, rnoise) = kernels.reference_of("gguf_quantize_error")(x, qtype, im)
    assert np.array_equal(data, rdata)
    # the reference's figures are float32 norms (equal to their rounding); the exact float64 ones below
    assert sig == pytest.approx(rsig, rel=1e-5) and noise == pytest.approx(rnoise, rel=1e-4)
    if use_imatrix:   # float64 sums in another order: equal to float64 rounding
        deq = np.asarray(gq.dequantize(data, qtype), dtype=np.float64).reshape(x.shape)
        xd = x.double().numpy()
        assert sig == pytest.approx(float((xd * xd).sum()), rel=1e-12)
        assert noise == pytest.approx(float(((xd - deq) ** 2).sum()), rel=1e-12)


def test_dispatch(backend, monkeypatch):
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(5))
    assert kernels.backend_for("gguf_quantize", "cpu").name == "c"
    calls = []
    monkeypatch.setattr(ggml_cpu, "quantize", lambda *a, **k: calls.append(a) or ggml_cpu.quantize_with_error(*a, error=False)[0])
    kernels.register("gguf_quantize", "cpu", kernels.Backend("c", ggml_cpu.quantize, ggml_cpu.available,
                                                             ggml_cpu.supports_quantize))
    try:
        out = kernels.call("gguf_quantize", x, T.Q4_K, None)
        assert len(calls) == 1 and np.array_equal(out, quantize_tensor(x, T.Q4_K))
        im = torch.rand(512)            # an importance matrix: the C backend too
        assert ggml_cpu.supports_quantize(x, T.Q4_K, im) and ggml_cpu.supports_quantize(x, T.Q4_0, im.numpy())
        out = kernels.call("gguf_quantize", x, T.Q4_K, im)
        assert len(calls) == 2 and np.array_equal(out, quantize_tensor(x, T.Q4_K, im))
        assert ggml_cpu.supports_quantize(x, T.Q8_0, torch.rand(3))   # Q8_0 ignores it, as the reference does
        bad = im.clone()
        bad[7] = float("nan")           # a non-finite importance matrix: the reference
        assert not ggml_cpu.supports_quantize(x, T.Q4_K, bad)
        kernels.call("gguf_quantize", x, T.Q4_K, bad)
        with pytest.raises(ValueError, match="imatrix"):   # a mis-sized one: the reference, and its error
            kernels.call("gguf_quantize", x, T.Q4_K, torch.rand(256))
        kernels.call("gguf_quantize", x, T.F16, None)  # float types: the reference
        assert len(calls) == 2
        monkeypatch.setenv("QTOOL_KERNELS", "reference")
        kernels.call("gguf_quantize", x, T.Q4_K, None)
        kernels.call("gguf_quantize", x, T.Q4_K, im)
        assert len(calls) == 2
    finally:
        kernels._register_builtin()


@pytest.mark.slow
def test_c_backend_on_smollm2_weights(backend, smollm2_dir):
    """Real bf16 weights; rows of 576 regrouped into rows of 2304 (9 super-blocks) for the K types; with
    and without an importance matrix."""
    from safetensors import safe_open

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.29.mlp.up_proj.weight", "model.embed_tokens.weight"]
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(n).reshape(-1, 2304)[:384] for n in names]
    for qtype in TYPES:
        for i, (name, w) in enumerate(zip(names, tensors)):
            assert _blocks_differing(backend.quantize(w, qtype), quantize_tensor(w, qtype), qtype) == 0, (qtype.name, name)
            if qtype in IMATRIX_SUPPORTED:
                im = torch.from_numpy(_imatrix(w.shape[1], seed=i))
                assert _blocks_differing(backend.quantize(w, qtype, im), quantize_tensor(w, qtype, im), qtype) == 0, \
                    (qtype.name, name, "imatrix")


def test_setup_builds_the_extension_and_survives_a_failed_compile(tmp_path):
    """setup.py's build_ext: with a compiler the library is built and loads; with a compiler that
    fails, the build still succeeds (the package installs and runs the torch reference)."""
    if _compiler() is None:
        pytest.skip("no C compiler on this machine")

    def build(out: Path, env_extra: dict) -> subprocess.CompletedProcess:
        env = {**os.environ, **env_extra}
        return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out),
                               "--build-temp", str(out / "tmp")], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    ok = build(tmp_path / "ok", {})
    assert ok.returncode == 0, ok.stderr[-2000:]
    libs = list((tmp_path / "ok" / "qtool" / "kernels").glob("_ggml_blocks*"))
    assert len(libs) == 1
    probe = ("import sys; from qtool.kernels import ggml_cpu; import torch, numpy as np;"
             "from qtool.formats.gguf.quants import quantize_tensor as r; x = torch.randn(4, 512);"
             "assert ggml_cpu.available(); sys.exit(0 if np.array_equal(ggml_cpu.quantize(x, 12), r(x, 12)) else 1)")
    env = {**os.environ, "QTOOL_GGML_BLOCKS_LIB": str(libs[0]), "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", probe], env=env, timeout=300).returncode == 0

    failed = build(tmp_path / "failed", {"CC": "false"})
    assert failed.returncode == 0, failed.stderr[-2000:]
    assert "the torch reference will be used" in failed.stderr
    assert not list((tmp_path / "failed").rglob("_ggml_blocks*.so"))
    # and without a library qtool quantizes with the reference
    probe = ("import sys; from qtool import kernels; from qtool.kernels import ggml_cpu;"
             "sys.exit(0 if not ggml_cpu.available() and kernels.backend_for('gguf_quantize', 'cpu') is None else 1)")
    env = {**os.environ, "QTOOL_GGML_BLOCKS_LIB": str(tmp_path / "failed" / "none.so"), "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", probe], env=env, timeout=300).returncode == 0


def test_cuda_backend_of_the_gguf_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GGUF block ops have no CUDA backend to test here (the reference "
                    "and the C backend run on CPU; a tensor on the GPU is copied to the host)")
    x = torch.randn(16, 512, device="cuda")
    assert np.array_equal(kernels.call("gguf_quantize", x, T.Q4_K, None), quantize_tensor(x.cpu(), T.Q4_K))
