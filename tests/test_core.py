"""Numerical core: packing, the RTN grid, group layout. Exact where the operation is deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.core.affine import quantize_float8, quantize_int
from qtool.core.grouping import column_groups, divisors_for_groups, to_groups
from qtool.core.metrics import sqnr_db
from qtool.core.packing import pack_bits, unpack_bits
from qtool.qtypes import QTYPES, get_qtype

BITS = [2, 3, 4, 8]
SHAPES = [(1, 1), (7, 45), (64, 576), (3, 32), (5, 33)]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_pack_roundtrip_exact(bits, shape, dim):
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    packed = pack_bits(v, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == math.ceil(shape[dim] * bits / 32)
    assert torch.equal(unpack_bits(packed, bits, shape[dim], dim=dim), v)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_pack_matches_compressed_tensors_bit_for_bit(bits, shape, dim):
    """Our packer is the fast path; compressed-tensors' own packer is the consumer's definition."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(1)
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
    ours = pack_bits(signed.to(torch.int32) + 2 ** (bits - 1), bits, dim=dim)
    assert torch.equal(ours, ct.pack_to_int32(signed, bits, packed_dim=dim))


def test_group_layout_with_partial_last_group():
    assert column_groups(10, "group", 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert column_groups(3, "channel", None).tolist() == [0, 0, 0]
    w = torch.arange(10.0).reshape(1, 10)
    assert to_groups(w, 4).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]]
    assert divisors_for_groups(576) == [16, 32, 64]
    assert divisors_for_groups(1536, up_to=128) == [16, 32, 64, 128]


def _ct_args(bits: int, symmetric: bool, strategy: str, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group_size, type="int")


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [None, 32], ids=["channel", "g32"])
def test_rtn_codes_equal_compressed_tensors_quantizer(bits, symmetric, group):
    """Given the same (stored) scale and zero point, compressed-tensors' quantize() gives our codes;
    and our scale is the one its min/max observer formula gives, rounded to the weight dtype."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(16, 96, generator=g) * 0.05).to(torch.bfloat16)
    strategy = "group" if group else "channel"
    qw = quantize_int(w, get_qtype(f"int{bits}"), strategy=strategy, group_size=group, symmetric=symmetric)
    args = _ct_args(bits, symmetric, strategy, group)
    view = w.float().reshape(16, -1, group or 96)
    ref_scale, _ = calculate_qparams(view.amin(-1), view.amax(-1), args)
    assert torch.equal(qw.scale, ref_scale.to(torch.bfloat16).reshape(qw.scale.shape).where(ref_scale.reshape(qw.scale.shape) > 0, qw.scale))
    zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale, dtype=torch.int8)
    codes = quantize(x=w.float(), scale=qw.scale.float(), zero_point=zp, args=args, dtype=torch.int8)
    assert torch.equal(codes, qw.codes)


@pytest.mark.parametrize("name", [n for n in QTYPES if n.startswith("int")])
def test_on_grid_weights_round_trip_exactly(name):
    """A weight that already lies on the grid (codes * scale) comes back bit-identical."""
    qt = get_qtype(name)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(int(qt.qmin), int(qt.qmax) + 1, (8, 64), generator=g)
    codes[:, 0] = int(qt.qmin)  # pin each row's range so the symmetric scale is recovered exactly
    codes[:, 1] = int(qt.qmax)
    scale = torch.full((8, 1), 2.0**-6)
    w = codes.float() * scale
    qw = quantize_int(w, qt, strategy="channel", symmetric=False, scale_dtype=torch.float32)
    assert torch.equal(qw.dequantize(torch.float32), w)


@pytest.mark.parametrize("bits,min_db", [(8, 40.0), (4, 18.0), (3, 12.0), (2, 5.0)], ids=lambda x: str(x))
def test_rtn_error_is_bounded(bits, min_db):
    """Lossy: per-element error <= scale/2 (+ bf16 rounding of the result); SQNR of a Gaussian weight
    at per-channel granularity is above a floor ~6 dB/bit below the ideal (tolerance for outliers)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 256, generator=g)
    qw = quantize_int(w, get_qtype(f"int{bits}"), strategy="group", group_size=64, symmetric=True)
    err = (qw.dequantize(torch.float32) - w).abs()
    bound = qw.scale.float().repeat_interleave(64, dim=1) * 0.5 + 1e-6
    # the top of the symmetric range is clamped at qmax: error there is at most one step
    assert (err <= 2 * bound).all()
    assert (err <= bound).float().mean() > 0.99
    assert sqnr_db(w, qw.dequantize(torch.float32)) > min_db


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_float8_scale_and_error(strategy):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    qw = quantize_float8(w, get_qtype("fp8"), strategy=strategy)
    assert qw.codes.dtype == torch.float8_e4m3fn
    assert qw.scale.shape == ((16, 1) if strategy == "channel" else (1, 1))
    amax = qw.codes.float().abs().amax(-1 if strategy == "channel" else None)
    assert torch.allclose(amax, torch.full_like(amax, 448.0), rtol=0.07)  # max maps to the top of e4m3 (bf16 scale rounding)
    assert sqnr_db(w, qw.dequantize(torch.float32)) > 28  # e4m3: 3 mantissa bits -> ~30 dB


def test_all_zero_group_gets_unit_scale():
    w = torch.zeros(2, 32)
    qw = quantize_int(w, get_qtype("int4"), strategy="group", group_size=16)
    assert torch.equal(qw.scale, torch.ones(2, 2))
    assert torch.equal(qw.dequantize(torch.float32), w)


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_fast_pack_equals_reference_packer(bits, shape, dim):
    from qtool.core.packing import pack_bits_reference

    v = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(6), dtype=torch.int32)
    assert torch.equal(pack_bits(v, bits, dim=dim), pack_bits_reference(v, bits, dim=dim))


def test_nan_and_inf_are_found_by_the_finite_check():
    from qtool.errors import NumericalError
    from qtool.pipeline import check_finite

    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.zeros(4, 4, dtype=torch.bfloat16)
        w[2, 3] = bad
        with pytest.raises(NumericalError, match="tensor x.weight"):
            check_finite("x.weight", w)
    check_finite("ok.weight", torch.ones(2, 2))
