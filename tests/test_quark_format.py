"""`-f quark`: AMD Quark's export layout, proven by transformers + amd-quark 0.13 (in the isolated
consumer venv: see tests/onthefly_fixtures.py)."""

from __future__ import annotations

import json

import pytest
import torch

from onthefly_fixtures import assert_refused, assert_runtime_matches, otf_consumed, otf_outputs, otf_sources, hqq_weight  # noqa: F401
from qtool.core.affine import quantize_float8, quantize_int
from qtool.core.packing import pack_awq_order, unpack_awq_order
from qtool.formats import quark as K
from qtool.qtypes import get_qtype


def test_awq_nibble_order_by_hand():
    """Nibble j of a word holds column [0, 2, 4, 6, 1, 3, 5, 7][j] of its 8 columns."""
    v = torch.arange(8).reshape(1, 8)
    assert [w & 0xFFFFFFFF for w in pack_awq_order(v)[0].tolist()] == [0x75316420]
    x = torch.randint(0, 16, (5, 24))
    assert torch.equal(unpack_awq_order(pack_awq_order(x), 24), x.to(torch.int32))


@pytest.mark.parametrize("kind", ["uint4", "int4", "fp8-channel", "fp8-tensor"])
def test_pack_unpack_round_trip(kind):
    torch.manual_seed(1)
    w = torch.randn(40, 96).to(torch.bfloat16)
    if kind.startswith("fp8"):
        strategy = kind.split("-")[1]
        qw = quantize_float8(w, get_qtype("fp8_e4m3"), strategy=strategy)
        spec = K.weight_spec("fp8_e4m3", strategy, None, True)
    else:
        qw = quantize_int(w, get_qtype("int4"), strategy="group", group_size=32, symmetric=kind == "int4")
        spec = K.weight_spec(kind, "group", 32, kind == "int4")
    t = K.pack_quark(qw)
    if not kind.startswith("fp8"):
        assert t["weight"].shape == (96, 5) and t["weight"].dtype == torch.int32  # [in, out/8]
        assert t["weight_scale"].shape == (3, 40) and t["weight_zero_point"].shape == (3, 5)
        assert (kind == "int4") == (not t["weight_zero_point"].any())
    else:
        assert t["weight_scale"].shape == ((40,) if kind == "fp8-channel" else ())
    back = K.unpack_quark(t, spec, "test")
    assert torch.equal(back.codes.view(torch.uint8), qw.codes.view(torch.uint8))
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("flags,words", [
    ("-b 8", "int4/uint4 per group"),
    ("-b 4", "int4/uint4 per group"),
    ("-b 2 -g 32", "int4/uint4 per group"),
])
def test_refusals(otf_sources, tmp_path, flags, words):
    assert_refused(otf_sources["llama32"], flags, "quark", words, tmp_path)


def test_config_is_quark_qconfig(otf_outputs):
    q = json.loads((otf_outputs["quark-r4asym"] / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "quark" and q["export"]["pack_method"] == "reorder"
    wt = q["global_quant_config"]["weight"]
    assert (wt["dtype"], wt["qscheme"], wt["group_size"], wt["symmetric"], wt["ch_axis"]) == ("uint4", "per_group", 32, False, 1)
    assert q["exclude"] == ["lm_head"]


@pytest.mark.parametrize("case", ["quark-r4asym", "quark-r4sym-bf16", "quark-h4", "quark-fp8", "quark-fp8-tensor"])
def test_quark_loader_computes_our_weights(otf_consumed, otf_outputs, case):
    """transformers + amd-quark (float32 compute: Quark's QParamsLinear dequantizes to the model
    dtype) against our reading of the folder: weights within 1e-5, logits within 1e-4."""
    res = otf_consumed[case]
    assert "QParamsLinear" in res["modules"]
    assert_runtime_matches(res, otf_outputs[case], K, 1e-5, 1e-4)
