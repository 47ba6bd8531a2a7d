"""Contracts every registered method and format must keep; new plug-ins are picked up from the registries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtool.config import make_recipe, parse_group_size
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.qtypes import get_qtype
from qtool.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("qtype", ["int8", "int4", "int3", "int2", "fp8_e4m3"])
def test_method_returns_unpacked_weight_that_dequantizes_to_the_input_shape(name, qtype):
    method = METHODS.get(name)()
    qt = get_qtype(qtype)
    if qt.kind not in method.supported_kinds:
        pytest.skip(f"{name} does not produce {qtype}")
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    strategy, g = ("group", 32) if qt.is_int else ("channel", None)
    spec = LayerSpec("x.weight", qt, strategy, g, True)
    if method.needs_calibration:  # calibration methods take the layer's input statistics too
        qw, _ = method.quantize_with_stats(w, spec, torch.eye(64))
    else:
        qw = method.quantize(w, spec)
    assert isinstance(qw, QuantizedWeight)
    assert qw.codes.shape == w.shape and qw.codes.dtype == qt.torch_dtype
    assert qw.scale.dtype == w.dtype  # scales in the checkpoint dtype
    if qt.is_int:
        assert int(qw.codes.min()) >= qt.qmin and int(qw.codes.max()) <= qt.qmax
    assert qw.dequantize().shape == w.shape


@pytest.mark.parametrize("name", FORMATS.names())
def test_format_declares_its_capabilities(name):
    cls = FORMATS.get(name)
    assert cls.__doc__, "the docstring is the one-line description in `qtool formats`"
    assert isinstance(cls.output_is_dir, bool) and isinstance(cls.partial_groups, bool)


def test_registry_normalises_aliases_and_refuses_duplicates():
    class Thing:
        pass

    class Other:
        pass

    r: Registry = Registry("thing")
    r.register("foo-bar", aliases=("fb",))(Thing)
    assert r.get("FOO_BAR") is Thing and r.get("fb") is Thing
    with pytest.raises(ValueError):
        r.register("foo_bar")(Other)
    with pytest.raises(UsageError, match="choose one of: foo-bar"):
        r.get("nope")


def test_compressed_tensors_is_found_under_its_aliases():
    assert FORMATS.get("ct") is FORMATS.get("compressed_tensors") is FORMATS.get("compressed-tensors")


@pytest.mark.parametrize(
    "text,expected",
    [("channel", ("channel", None)), ("-1", ("channel", None)), ("tensor", ("tensor", None)), ("64", ("group", 64)), (None, ("channel", None))],
    ids=["channel", "minus-one", "tensor", "g64", "default"],
)
def test_group_size_spellings(text, expected):
    assert parse_group_size(text) == expected


@pytest.mark.parametrize("bad", ["0", "-5", "abc"])
def test_bad_group_sizes_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--group-size"):
        parse_group_size(bad)


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(bits=7), "--bits 7"),
        (dict(qtype="fp8", asym=True), "--asym"),
        (dict(qtype="fp8", group_size="64"), "--group-size 64"),
        (dict(bits=4, group_size="tensor"), "tensor"),
        (dict(bits=8, qtype="int4"), "contradicts"),
        (dict(qtype="int7"), "unknown weight type"),
    ],
    ids=["bits7", "fp8-asym", "fp8-group", "int-tensor", "bits-vs-qtype", "unknown-qtype"],
)
def test_recipe_refuses_bad_flag_combinations(kwargs, err):
    base = dict(method="rtn", bits=None, qtype=None, group_size="channel", asym=False, fmt="compressed-tensors")
    with pytest.raises(UsageError, match=err):
        make_recipe(**{**base, **kwargs})


def test_plain_safetensors_format_refuses_to_quantize():
    recipe = make_recipe(method="rtn", bits=4, qtype=None, group_size="32", asym=False, fmt="safetensors")
    with pytest.raises(UnsupportedError):
        FORMATS.get("safetensors")().check_recipe(recipe)


@pytest.mark.parametrize("readme", ["qtool/methods/README.md", "qtool/formats/README.md", "kernels/README.md", "calib_data/README.md"])
def test_extension_point_readmes_name_paths_that_exist(readme):
    import re

    text = (ROOT / readme).read_text()
    for path in re.findall(r"`((?:qtool|tests|kernels|calib_data)/[\w/.]+\.py)`", text):
        assert (ROOT / path).exists() or "<name>" in path, f"{readme} names {path}, which does not exist"
