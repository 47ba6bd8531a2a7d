"""GGUF block quantizers (`qtool/formats/gguf/quants.py`) against their definitions.

1. Legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): byte-identical to gguf-py's numpy ports of llama.cpp.
2. Every type, with and without an importance matrix: byte-identical to llama.cpp itself --
   `ggml-quants.c` compiled from the vendored source (tests/ggml_ref.py) and called through ctypes.
   No tolerance: all blocks must match, on Gaussian data with edge-case blocks and on SmolLM2 weights.
3. Round trip through `gguf.quants.dequantize`: SQNR per type on N(0,1) data (floors sit ~0.5-1 dB
   under the measured values: Q8_0 45.4, Q6_K 35.0, Q5_K 28.8, Q5_1 28.4, Q5_0 27.4, Q4_K 22.9,
   Q4_1 22.1, Q4_0 21.3, Q3_K 16.4, Q2_K 10.5 dB), and an importance matrix must improve the
   importance-weighted SQNR (measured gains 1.1-2.8 dB).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from qtool.formats.gguf import quants as Q
from qtool.formats.gguf.quants import IMATRIX_SUPPORTED, SUPPORTED, quantize_tensor

LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
KTYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL = LEGACY + KTYPES
ids = lambda q: q.name  # noqa: E731


def _edge_data(rows: int, cols: int, seed: int, extreme: bool = False) -> np.ndarray:
    """Gaussian rows plus blocks that exercise every branch: all-zero 32/256-blocks, one huge value,
    negative-max blocks, +a/-a ties for the abs-max, constant blocks, fp16-subnormal and large scales,
    exact .5 rounding ties, and sub-blocks of zeros inside a non-zero super-block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0, :] = 0.0
    x[1, :256] = 0.0
    x[2, 7] = 1e3
    x[3, :256] = -np.abs(x[3, :256])
    x[3, 300] = -50.0
    x[4, :32] = 0.5
    x[4, 32:64] = -2.0
    x[5, :32] = np.where(np.arange(32) % 2 == 0, 3.0, -3.0)
    x[6] *= 1e-6                        # scales below fp16's normal range
    x[7] *= 3e-9                        # d and dmin underflow to fp16 zero
    x[8] *= 1e3
    x[9] = np.round(x[9] * 4) / 4       # many values on exact rounding ties
    x[10, 16:32] = 0.0
    x[10, 64:80] = 0.0
    x[11, ::2] = 0.0
    x[12] = np.abs(x[12]) + 1.0         # all positive, min > 0
    x[13, :256] = np.linspace(-1, 1, 256, dtype=np.float32)
    x[14] = rng.standard_t(2, cols).astype(np.float32)  # heavy tails
    if extreme:  # C's undefined corners, pinned to what GCC x86-64 does (see _c_int8, _nearest_int)
        x[15] *= 1e-38                  # float32 subnormals: 1/d overflows to inf
        x[16] *= 1e7                    # d, dmin overflow fp16 to inf
        x[17, 40] = 3e38
    return x


def _imatrix(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.random(cols) ** 4 * 10 + 1e-3).astype(np.float32)
    w[:5] = 0.0                         # dead columns occur in real imatrix files
    return w


def _diff_blocks(a: np.ndarray, b: np.ndarray, qtype: T) -> int:
    assert a.shape == b.shape and a.dtype == np.uint8
    ts = GGML_QUANT_SIZES[qtype][1]
    return int((a.reshape(-1, ts) != b.reshape(-1, ts)).any(1).sum())


# --------------------------------------------------------------------------------------------------
# 1. legacy types vs gguf-py


@pytest.mark.parametrize("qtype", LEGACY, ids=ids)
def test_legacy_matches_gguf_py(qtype):
    x = _edge_data(48, 1024, seed=1, extreme=True)
    xb = torch.from_numpy(x[18:]).to(torch.bfloat16)  # bf16 input: computed in float32
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # numpy warns on the inf/NaN casts
        warnings.simplefilter("ignore")
        ref, ref_b = gq.quantize(x, qtype), gq.quantize(xb.float().numpy(), qtype)
    assert np.array_equal(quantize_tensor(torch.from_numpy(x), qtype), ref)
    assert np.array_equal(quantize_tensor(xb, qtype), ref_b)


# --------------------------------------------------------------------------------------------------
# 2. everything vs llama.cpp's C


@pytest.fixture(scope="session")
def ggml_ref():
    import ggml_ref as gr

    try:
        return gr.GGMLRef()
    except Exception as e:  # no C compiler, no sdist and no network
        pytest.skip(f"could not build llama.cpp's ggml-quants.c: {e}")


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", ALL, ids=ids)
def test_byte_identical_to_llama_cpp(ggml_ref, qtype, use_imatrix):
    x = _edge_data(96, 3072, seed=2, extreme=True)
    im = _imatrix(3072, seed=3) if use_imatrix else None
    ours = quantize_tensor(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im))
    assert _diff_blocks(ours, ggml_ref.quantize(x, qtype, im), qtype) == 0


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=ids)
def test_chunking_does_not_change_bytes(ggml_ref, qtype, monkeypatch):
    """Chunks that split rows (legacy imatrix needs whole-row statistics) give the same bytes."""
    monkeypatch.setattr(Q, "_WORKSET_BYTES", 200_000)
    x = _edge_data(24, 2304, seed=4)
    im = _imatrix(2304, seed=5)
    for w in (None, im):
        ours = quantize_tensor(torch.from_numpy(x), qtype, None if w is None else torch.from_numpy(w))
        assert _diff_blocks(ours, ggml_ref.quantize(x, qtype, w), qtype) == 0


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1], ids=ids)
def test_signed_zero_min_matches_llama_cpp(ggml_ref, qtype):
    """A block whose smallest value is a zero stores the sign of its first zero as the min (C's running
    `if (v < min) min = v`), with and without an importance matrix; torch's amin may return either."""
    rng = np.random.default_rng(9)
    x = np.abs(rng.standard_normal((16, 512))).astype(np.float32)
    x[:, ::5] = 0.0
    x[:, 2::7] = -0.0
    x[0] = np.where(rng.random(512) < 0.5, 0.0, -0.0)      # all-zero blocks of both signs
    x[1] = -x[1]                                             # max a zero
    for r in range(2, 16):
        x[r, rng.random(512) < 0.3] = rng.choice(np.array([0.0, -0.0], np.float32))
    for im in (None, _imatrix(512, seed=10)):
        ours = quantize_tensor(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im))
        assert _diff_blocks(ours, ggml_ref.quantize(x, qtype, im), qtype) == 0


@pytest.mark.parametrize("qtype", sorted(IMATRIX_SUPPORTED, key=int), ids=ids)
def test_overflowing_imatrix_matches_llama_cpp(ggml_ref, qtype):
    """Importance values near float32's max overflow the weights and the searches' sums: NaN scales,
    stored as fp16 NaN and requantized against GGML_FP16_TO_FP32's NaN (sign | 0x7FC00000; torch's
    half->float gives 0x7FFFFFFF, whose nearest_int differs). Whatever rows share a chunk."""
    x = _edge_data(24, 2304, seed=11)
    x[6] *= 1e17                                             # squares near float32's max
    for im in (np.full(2304, 3e38, np.float32), _imatrix(2304, seed=12) * np.float32(1e30)):
        ref = ggml_ref.quantize(x, qtype, im)
        for rows in (slice(0, 24), slice(2, 7), slice(6, 7)):
            ours = quantize_tensor(torch.from_numpy(x[rows]), qtype, torch.from_numpy(im))
            assert _diff_blocks(ours, ref[rows], qtype) == 0, rows


@pytest.mark.parametrize("qtype", sorted(IMATRIX_SUPPORTED, key=int), ids=ids)
def test_nonfinite_row_bytes_do_not_depend_on_the_chunk(qtype):
    """A row holding NaN/inf is not guaranteed llama.cpp's bytes, but its bytes are its own: the same
    whatever rows share its chunk (the C backend hands such rows to the reference on their own)."""
    x = torch.from_numpy(_edge_data(24, 3072, seed=7, extreme=True))
    x[20, 100] = float("nan")
    x[21, 5] = float("inf")
    x[23] = float("nan")
    im = torch.from_numpy(_imatrix(3072, seed=3))
    for w in (None, im):
        full = quantize_tensor(x, qtype, w)
        for r in (20, 21, 23):
            assert np.array_equal(quantize_tensor(x[r:r + 1], qtype, w)[0], full[r]), r


@pytest.mark.slow
def test_byte_identical_on_smollm2_weights(ggml_ref, smollm2_dir):
    """Real weights (bf16) of a few layers. The ref path quantizes the flat tensor, so rows of 576 are
    regrouped into rows of 2304 = 9 super-blocks to exercise the K types too."""
    from safetensors import safe_open

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.29.self_attn.k_proj.weight", "model.layers.29.mlp.up_proj.weight"]
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(n).reshape(-1, 2304) for n in names]
    for qtype in ALL:
        for i, w in enumerate(tensors):
            im = _imatrix(w.shape[1], seed=i) if i % 2 else None   # half of them with an imatrix
            ours = quantize_tensor(w, qtype, None if im is None else torch.from_numpy(im))
            ref = ggml_ref.quantize(w.float().numpy(), qtype, im)
            assert _diff_blocks(ours, ref, qtype) == 0, (qtype.name, names[i])


def test_float_types_match_llama_cpp(ggml_ref):
    """F16 / BF16 stores: round to nearest even, llama.cpp's NaN handling (F16: 0x7E00 with the sign;
    BF16: quiet bit forced, payload kept), overflow to inf, subnormals kept."""
    special = np.array([
        0x7FC00001, 0x7F800001, 0xFFC12345, 0x7FBFFFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001,
        0x80000000, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x3F801000, 0x3F803000, 0x3F808000,
        0x3F818000, 0x3F817FFF, 0x38800000, 0x387FC000,
    ], dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(6)
    x = np.concatenate([special, (rng.standard_normal(236) * 10.0 ** rng.integers(-9, 6, 236)).astype(np.float32)])
    x = x.reshape(8, 32)
    f16 = quantize_tensor(torch.from_numpy(x), T.F16)
    assert np.array_equal(f16.view(np.uint16), ggml_ref.fp32_to_fp16(x))
    bf16 = quantize_tensor(torch.from_numpy(x), T.BF16)
    assert np.array_equal(bf16.view(np.uint16), ggml_ref.fp32_to_bf16(x))
    assert np.array_equal(quantize_tensor(torch.from_numpy(x), T.F32).view(np.float32).view(np.uint32),
                          x.view(np.uint32))
    xb = torch.from_numpy(x).to(torch.bfloat16)               # bf16 in: exact pass-through
    assert np.array_equal(quantize_tensor(xb, T.BF16).view(np.uint16),
                          ggml_ref.fp32_to_bf16(xb.float().numpy()))
    assert f16.shape == bf16.shape == (8, 64)


# --------------------------------------------------------------------------------------------------
# 3. round trip

SQNR_FLOOR = {
    T.Q8_0: 44.5, T.Q6_K: 34.3, T.Q5_K: 28.2, T.Q5_1: 27.8, T.Q5_0: 26.8, T.Q4_K: 22.3, T.Q4_1: 21.5,
    T.Q4_0: 20.7, T.Q3_K: 15.8, T.Q2_K: 9.9, T.F16: 70.0, T.BF16: 54.0,
}


def _sqnr(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(x.shape[1], np.float32) if w is None else w
    return float(10 * np.log10(((x ** 2) * w).sum() / (((y - x) ** 2) * w).sum()))


@pytest.mark.parametrize("qtype", sorted(SQNR_FLOOR, key=int), ids=ids)
def test_roundtrip_sqnr(qtype):
    x = np.random.default_rng(7).standard_normal((256, 1024)).astype(np.float32)
    q = quantize_tensor(torch.from_numpy(x), qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert q.dtype == np.uint8 and q.shape == (256, 1024 // bs * ts)
    y = gq.dequantize(q, qtype).reshape(x.shape)
    assert _sqnr(x, y) >= SQNR_FLOOR[qtype]
    if qtype in IMATRIX_SUPPORTED:
        im = np.random.default_rng(8).random(1024).astype(np.float32) ** 4 * 10 + 0.01
        yi = gq.dequantize(quantize_tensor(torch.from_numpy(x), qtype, torch.from_numpy(im)), qtype).reshape(x.shape)
        assert _sqnr(x, yi, im) >= _sqnr(x, y, im) + 0.5


# --------------------------------------------------------------------------------------------------
# API


def test_api_errors_and_supported():
    assert SUPPORTED == {T.F32, T.F16, T.BF16, *ALL}
    with pytest.raises(ValueError, match=r"Q4_K.*row length 576"):
        quantize_tensor(torch.zeros(4, 576), T.Q4_K)
    with pytest.raises(ValueError, match=r"Q8_0.*row length 40"):
        quantize_tensor(torch.zeros(4, 40), T.Q8_0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_tensor(torch.zeros(256), T.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize_tensor(torch.zeros(2, 256), T.Q4_K, torch.ones(128))
    with pytest.raises(ValueError, match="unsupported"):
        quantize_tensor(torch.zeros(2, 256), T.IQ2_XXS)
    # Q8_0 ignores an importance matrix, as llama.cpp does
    x = torch.randn(3, 64)
    assert np.array_equal(quantize_tensor(x, T.Q8_0, torch.rand(64)), quantize_tensor(x, T.Q8_0))
    # fp16 input is computed in float32: same bytes as the float32 tensor it holds
    xh = torch.randn(4, 512).half()
    assert np.array_equal(quantize_tensor(xh, T.Q4_K), quantize_tensor(xh.float(), T.Q4_K))
