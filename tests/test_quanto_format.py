"""`-f quanto`: optimum-quanto's layout, proven by `QuantizedModelForCausalLM.from_pretrained`
(optimum-quanto 0.2.7, in the isolated consumer venv: see tests/onthefly_fixtures.py)."""

from __future__ import annotations

import pytest
import torch

from onthefly_fixtures import assert_refused, assert_runtime_matches, otf_consumed, otf_outputs, otf_sources, hqq_weight  # noqa: F401
from qtool.core.affine import quantize_float8, quantize_int
from qtool.formats import quanto as Q
from qtool.methods.base import LayerSpec
from qtool.methods.hqq import HQQMethod
from qtool.qtypes import get_qtype


@pytest.mark.parametrize("width,group", [(96, None), (128, None), (160, 32), (256, 128), (384, 128), (576, 96), (1536, 128),
                                         (200, None)])
def test_quanto_group_rule(width, group):
    """QModuleMixin: 128, stepping down by 32 while it does not divide the width (not below 32);
    widths <= 128, and those no such size divides, get one group per row."""
    assert Q.quanto_group_size(width) == group


@pytest.mark.parametrize("kind", ["int4-asym", "int4-sym", "int2", "int4-hqq", "int8", "fp8"])
def test_pack_unpack_round_trip(kind):
    torch.manual_seed(0)
    w = torch.randn(24, 160).to(torch.bfloat16)
    g = Q.quanto_group_size(160)
    if kind == "int8":
        qw = quantize_int(w, get_qtype("int8"), strategy="channel", symmetric=True)
    elif kind == "fp8":
        qw = quantize_float8(w, get_qtype("fp8_e4m3"), strategy="channel")
    elif kind == "int4-hqq":
        qw = HQQMethod().quantize(w, LayerSpec("w", get_qtype("int4"), "group", g, False))
    else:
        bits = 2 if kind == "int2" else 4
        qw = quantize_int(w, get_qtype(f"int{bits}"), strategy="group", group_size=g, symmetric=kind == "int4-sym")
    t = Q.pack_quanto(qw)
    name = {"int8": "qint8", "fp8": "qfloat8_e4m3fn", "int2": "qint2"}.get(kind, "qint4")
    back = Q.unpack_quanto(t, name, (24, 160), "test")
    if kind in ("int8", "fp8"):
        assert set(t) == {"_data", "_scale"} and t["_scale"].shape == (24, 1)
    else:
        per = 8 // qw.qtype.bits
        assert t["_data._data"].dtype == torch.uint8 and t["_data._data"].shape == (-(-24 * 160 // g // per), g)
        assert t["_shift"].dtype == (torch.bfloat16 if kind == "int4-hqq" else torch.int8)  # float shift only for float zeros
    assert torch.equal(back.codes.view(torch.uint8), qw.codes.view(torch.uint8))
    tol = 0.02 if kind == "int4-hqq" else 0  # shift = z*s rounded to bf16
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=0,
                               atol=tol * float(qw.scale.float().max()))


@pytest.mark.parametrize("flags,words", [
    ("-b 4 -g 64", "takes -g 128"),
    ("-b 4", "takes -g 128"),
    ("-b 8 -g 128", "per output channel"),
    ("-b 8 --asym", "no zero point"),
    ("-m hqq -b 8", "-m hqq always has zero points"),
    ("-b 3 -g 128", "holds int2, int4, int8 and fp8"),
])
def test_refusals(otf_sources, tmp_path, flags, words):
    assert_refused(otf_sources["llama32"], flags, "quanto", words, tmp_path)


def test_group_notes(otf_outputs):
    """The 96-wide layers go per channel, the 160-wide down_proj to groups of 32 (quanto's rule), said per layer."""
    qws, _ = Q.read_quantized(otf_outputs["quanto-h4"])
    assert {m: (q.strategy, q.group_size) for m, q in qws.items() if "down_proj" in m} == {
        f"model.layers.{i}.mlp.down_proj": ("group", 32) for i in range(2)}
    assert all(q.strategy == "channel" for m, q in qws.items() if "down_proj" not in m)


@pytest.mark.parametrize("case", ["quanto-h4", "quanto-r4asym-wide", "quanto-r2", "quanto-r8", "quanto-fp8"])
def test_quanto_loader_computes_our_weights(otf_consumed, otf_outputs, otf_sources, case):
    """Each QLinear's weight as quanto computes with it, and the logits, against our reading of the
    folder. float32 sources: quanto computes in float32, so within 1e-4 (sums in another order).
    The bf16 wide model goes through quanto's TinyGemm int4 kernel, which folds scale and shift
    into its own bf16 pair: weights within 1 % of the largest |w|, logits within 0.1 (bf16
    activations), while the quantization itself moves them by > 0.5 (checked)."""
    res = otf_consumed[case]
    assert res["modules"] == ["QLinear"]
    bf16 = res["dtype"] == "torch.bfloat16"
    assert bf16 == (case == "quanto-r4asym-wide")
    ours = assert_runtime_matches(res, otf_outputs[case], Q, (lambda w: 0.01 * float(w.abs().max())) if bf16 else 1e-5,
                                  0.1 if bf16 else 1e-4)["logits"]
    if bf16:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(otf_sources["wide"], dtype=torch.float32)
        with torch.no_grad():
            assert (base(res["ids"]).logits[0] - ours).abs().max() > 0.5


def test_stock_transformers_would_load_random_weights(otf_outputs):
    """Why the card says to use optimum-quanto: transformers itself reports the quantized weights
    missing (and would fill them randomly)."""
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(otf_outputs["quanto-r8"], output_loading_info=True)
    assert any(k.endswith("q_proj.weight") for k in info["missing_keys"])


def test_quanto_quantizer_gives_our_codes(otf_consumed):
    """optimum-quanto's own qint8 / qfloat8 QLinear on a bf16 weight: -f quanto's RTN (rounding
    "quanto": s = max|w| / 127 or / 448 and w / s in bf16) gives its data and scales bit for bit;
    qtool's plain grid (max|w| / 127.5, float32) does not."""
    from onthefly_fixtures import quanto_weight
    from qtool.config import QuantRecipe
    from qtool.methods.rtn import RTNMethod

    w, ref = quanto_weight(), otf_consumed["quanto-quantize"]
    for qname, qt in (("qint8", "int8"), ("qfloat8_e4m3fn", "fp8_e4m3")):
        opts = Q.QuantoWriter().spec_options(QuantRecipe(qtype=qt, strategy="channel"))
        assert opts == {"rounding": "quanto"}
        qw = RTNMethod().quantize(w, LayerSpec("w", get_qtype(qt), "channel", None, True, **opts))
        t, R = Q.pack_quanto(qw), ref[qname]
        assert t["_scale"].dtype == R["scale"].dtype and torch.equal(t["_scale"], R["scale"].reshape(t["_scale"].shape)), qname
        assert torch.equal(t["_data"].view(torch.uint8), R["data"].view(torch.uint8)), qname
    plain = quantize_int(w, get_qtype("int8"), strategy="channel", symmetric=True)
    assert not torch.equal(plain.codes, ref["qint8"]["data"])
