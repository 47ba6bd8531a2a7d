"""HQQ: the method (-m hqq) against hqq's own Quantizer, and hqq's layout (-f hqq) against hqq's
loader (`AutoHQQHFModel.from_quantized`), both run in the isolated consumer venv; float zero
points into the formats that hold only integer ones."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke_cli
from onthefly_fixtures import HQQ_CASES, assert_runtime_matches, otf_consumed, otf_outputs, otf_sources, hqq_weight  # noqa: F401
from qtool.core.affine import quantize_int
from qtool.core.metrics import sqnr_db
from qtool.core.qweight import QuantizedWeight
from qtool.core.rowpack import pack_rows, unpack_rows
from qtool.errors import UnsupportedError
from qtool.formats import hqq as hqq_format
from qtool.formats.compressed_tensors import CompressedTensorsWriter
from qtool.methods.base import LayerSpec
from qtool.methods.hqq import HQQMethod, hqq_quantize, shrink_lp
from qtool.qtypes import get_qtype


def _spec(bits: int, g: int | None) -> LayerSpec:
    return LayerSpec("w", get_qtype(f"int{bits}"), "group" if g else "channel", g, False, torch.float32)


# -- the method ------------------------------------------------------------------------------------
def test_shrinkage_operator():
    """sign(x) * max(|x| - |x|^(p-1) / beta, 0): small errors go to 0, large ones shrink."""
    x = torch.tensor([-2.0, -0.01, 0.0, 0.01, 2.0])
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert y[1] == y[2] == y[3] == 0
    torch.testing.assert_close(y[4], torch.tensor(2.0 - 2.0 ** -0.3 / 10), rtol=1e-6, atol=0)
    assert y[0] == -y[4]
    torch.testing.assert_close(shrink_lp(x, 10.0, 1.0), torch.sign(x) * (x.abs() - 0.1).clamp_min(0))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_beats_rtn(hqq_weight, bits):
    """The point of the method: lower error than min/max RTN (asymmetric, same groups of 64,
    float32 scales) at 2-4 bits. On a Gaussian weight the SQNR gain measured +0.43..+0.50 dB; on
    the heavy-tailed one the mean |error| (closer to HQQ's lp objective) is 4.8-7 % lower."""
    gauss = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    qt = get_qtype(f"int{bits}")
    for w in (gauss, hqq_weight):
        qw = HQQMethod().quantize(w, _spec(bits, 64))
        rtn = quantize_int(w, qt, strategy="group", group_size=64, symmetric=False, scale_dtype=torch.float32)
        assert qw.float_zeros and qw.codes.dtype == torch.int8
        assert int(qw.codes.min()) >= qt.qmin and int(qw.codes.max()) <= qt.qmax
        ours, theirs = qw.dequantize(torch.float32), rtn.dequantize(torch.float32)
        assert (w - ours).abs().mean() < 0.97 * (w - theirs).abs().mean()
    assert sqnr_db(gauss, HQQMethod().quantize(gauss, _spec(bits, 64)).dequantize(torch.float32)) > sqnr_db(
        gauss, quantize_int(gauss, qt, strategy="group", group_size=64, symmetric=False, scale_dtype=torch.float32).dequantize(torch.float32)) + 0.3


def test_partial_last_group_is_solved_on_its_own(hqq_weight):
    """96 columns in groups of 64: the last 32 columns form their own group, solved separately."""
    w = hqq_weight[:, :96]
    codes, scale, zero = hqq_quantize(w, 4, 64)
    assert codes.shape == (64, 96) and scale.shape == zero.shape == (64, 2)
    c2, s2, z2 = hqq_quantize(w[:, 64:].contiguous(), 4, 32)
    assert torch.equal(codes[:, 64:], c2) and torch.equal(scale[:, 1:], s2) and torch.equal(zero[:, 1:], z2)


def test_bf16_weights_keep_float32_zero_points_stored_at_the_scale_width():
    """The method keeps its zero points in float32; -f hqq stores them in the scale's dtype, as hqq
    does (so a bf16 file holds hqq's own bf16 zeros), and the bit count says 16 bits per zero."""
    w = torch.randn(16, 64).to(torch.bfloat16)
    qw = HQQMethod().quantize(w, LayerSpec("w", get_qtype("int4"), "group", 32, False))
    assert qw.scale.dtype == torch.bfloat16 and qw.zero_point.dtype == torch.float32
    assert qw.storage_bits() == 16 * 64 * 4 + 16 * 2 * 16 * 2
    t = hqq_format.pack_hqq(qw)
    assert t["zero"].dtype == torch.bfloat16 and torch.equal(t["zero"].reshape(16, 2), (qw.zero_point + 8).to(torch.bfloat16))


def test_hqq_refuses_what_it_cannot_do():
    with pytest.raises(UnsupportedError, match="per tensor"):
        HQQMethod().quantize(torch.randn(8, 32), LayerSpec("w", get_qtype("int4"), "tensor", None, False))


def test_matches_hqq_quantizer(otf_consumed, hqq_weight):
    """Our solver against hqq 0.2.8's Quantizer.quantize with BaseQuantizeConfig(nbits, group_size)'s
    weight settings (axis 1, round_zero at 4 bits, the legacy proximal solver) on the same float32
    weight: codes and scales bit for bit; zero points equal up to qtool's signed convention
    (z - 2^(b-1) in float32 and back: one float32 rounding)."""
    ref = otf_consumed["hqq-quantize"]
    for bits, g in HQQ_CASES:
        codes, scale, zero = hqq_quantize(hqq_weight, bits, g, torch.float32)
        r = ref[(bits, g)]
        offset = 2 ** (bits - 1)
        ours_u = (codes.float() + offset).reshape(-1, g)
        assert torch.equal(ours_u, r["W_q"]), (bits, g)
        assert torch.equal(scale.reshape(-1, 1), r["scale"]), (bits, g)
        # z - 2^(b-1) and back: within one float32 rounding at the offset's magnitude
        torch.testing.assert_close(zero.reshape(-1, 1) + offset, r["zero"], rtol=2.0**-22, atol=offset * 2.0**-22)
    # round_zero matters: without it, 4-bit codes land elsewhere on this weight
    from qtool.methods import hqq as H

    inv, z0 = H.initial_grid(hqq_weight.reshape(-1, 64), 4, round_zero=False)
    q = torch.round(hqq_weight.reshape(-1, 64) * inv + H.solve_zero(hqq_weight.reshape(-1, 64), inv, z0, 4)).clamp(0, 15)
    assert not torch.equal(q, ref[(4, 64)]["W_q"])


# -- the layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_unpack_round_trip(bits):
    torch.manual_seed(bits)
    w = torch.randn(40, 64)
    qw = HQQMethod().quantize(w, _spec(bits, 16))
    t = hqq_format.pack_hqq(qw)
    rows = 40 * 64 // 16
    per = {4: 2, 2: 4, 1: 8, 3: 10}.get(bits, 1)
    assert t["W_q"].shape == (-(-rows // per), 16)
    assert t["W_q"].dtype == (torch.int32 if bits == 3 else torch.uint8)
    assert t["scale"].shape == t["zero"].shape == (rows, 1)
    back = hqq_format.unpack_hqq(t, "test")
    assert torch.equal(back.codes, qw.codes)
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=0, atol=1e-6)


def test_4bit_words_by_hand():
    """hqq's 4-bit packing: row r of the first half in the HIGH nibble, row r + rows/2 in the low."""
    u = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    packed = pack_rows(u, 4, high_first=True)
    assert packed.tolist() == [[0x15, 0x26], [0x37, 0x48]]
    assert torch.equal(unpack_rows(packed, 4, 4, high_first=True), u.to(torch.int32))
    assert pack_rows(u, 4, high_first=False).tolist() == [[0x51, 0x62], [0x73, 0x84]]  # quanto's order


def test_writer_refusals(otf_sources, tmp_path):
    r = invoke_cli("quantize", otf_sources["llama32"], "--qtype", "fp8", "-f", "hqq", "-o", tmp_path / "x")
    assert r.exit_code == 3 and "1, 2, 3, 4, 5, 6, 8-bit integers, not fp8_e4m3" in r.output
    r = invoke_cli("quantize", otf_sources["llama32"], "-m", "hqq", "-b", "7", "-f", "hqq", "-o", tmp_path / "y")
    assert r.exit_code == 2 and "--bits 7" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_recipe_is_asymmetric_and_stock_transformers_cannot_load_it(otf_outputs):
    """-m hqq is asymmetric whatever --asym says; the folder has no weights file stock
    transformers reads, so it fails loudly instead of loading random weights."""
    from transformers import AutoModelForCausalLM

    folder = otf_outputs["hqq-h4g32"]
    prov = json.loads((folder / "qtool.json").read_text())
    assert prov["recipe"]["symmetric"] is False and prov["recipe"]["method"] == "hqq"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("case", ["hqq-h4g32", "hqq-h3g32", "hqq-h2g16", "hqq-h8ch", "hqq-rtn4-tied"])
def test_hqq_loader_computes_our_weights(otf_consumed, otf_outputs, case):
    """hqq's from_quantized (compute_dtype float32) against our reading of the same folder: every
    quantized module's weight as HQQLinear computes it, and the logits, within 1e-4 (float32
    sums in another order). Negative control: the 4-bit codes read in quanto's nibble order (low
    first) miss hqq's weights by orders of magnitude more."""
    res = otf_consumed[case]
    assert res["modules"] == ["HQQLinear"]
    ours = assert_runtime_matches(res, otf_outputs[case], hqq_format, 1e-5, 1e-4)
    if case == "hqq-h4g32":
        m = "model.layers.0.mlp.up_proj"
        state = hqq_format.load_modules(otf_outputs[case])[m]
        wrong = unpack_rows(state["W_q"], 4, 160 * 96 // 32, high_first=False).reshape(160, 96)
        good = ours["qws"][m]
        bad = QuantizedWeight(good.qtype, (wrong - 8).to(torch.int8), good.scale, good.zero_point, "group", 32)
        assert (bad.dequantize(torch.float32) - res["weights"][m]).abs().max() > 1e3 * 1e-5


# -- float zero points into integer-zero formats ------------------------------------------------------
def test_integer_zero_formats_get_rounded_zeros_with_the_loss_reported(otf_sources, tmp_path):
    r = invoke_cli("quantize", otf_sources["llama32"], "-m", "hqq", "-b", "4", "-g", "32", "-f", "compressed-tensors",
                   "-o", tmp_path / "ct", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    notes = [layer["note"] for layer in rep["layers"]]
    assert all(n and "float zero points rounded to integers" in n for n in notes)
    before, after = zip(*[[float(x.split()[0]) for x in n.split("SQNR ")[1].replace(" dB", "").split(" -> ")] for n in notes])
    assert all(b >= a for b, a in zip(before, after))  # rounding costs; the table shows the rounded value
    assert rep["sqnr_db_mean"] == pytest.approx(sum(after) / len(after), abs=0.06)


def test_integer_zero_writers_refuse_float_zeros_handed_directly(tmp_path):
    qw = HQQMethod().quantize(torch.randn(8, 32), _spec(4, 32))
    assert qw.with_integer_zeros().zero_point.dtype == torch.int8
    w = CompressedTensorsWriter()
    with pytest.raises(UnsupportedError, match="float"):
        w.add_quantized("m.weight", qw)


def test_storage_bits_count_float_zero_points():
    qw = QuantizedWeight(get_qtype("int4"), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1, dtype=torch.bfloat16),
                         torch.zeros(4, 1, dtype=torch.float16), "channel")
    assert qw.storage_bits() == 4 * 32 * 4 + 4 * 16 + 4 * 16
