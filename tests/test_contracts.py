"""Contracts every registered method and format must keep; new plug-ins are picked up from the registries."""

from __future__ import annotations

import json
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
    if method.needs_calibration and not hasattr(method, "quantize_with_stats"):
        pytest.skip(f"{name} works on whole blocks only: test_block_method_contract")
    if getattr(method, "weight_kind", None) == "codebook":  # additive codebooks (AQLM): their own unpacked object
        from qtool.core.codebook import CodebookWeight

        qw, _ = method.quantize_with_stats(w, spec, torch.eye(64))
        assert isinstance(qw, CodebookWeight) and qw.shape == w.shape and qw.dequantize().shape == w.shape
        assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) < 2**qw.bits
        return
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


@pytest.mark.parametrize("readme", ["qtool/methods/README.md", "qtool/formats/README.md", "qtool/kernels/README.md", "calib_data/README.md"])
def test_extension_point_readmes_name_paths_that_exist(readme):
    import re

    text = (ROOT / readme).read_text()
    for path in re.findall(r"`((?:qtool|tests|calib_data)/[\w/.]+\.py)`", text):
        assert (ROOT / path).exists() or "<name>" in path, f"{readme} names {path}, which does not exist"


# -- block-level methods and method parameters ---------------------------------------------------
def _tiny_block():
    """Decoder block 0 of a tiny random llama (MHA, so that every AWQ fold exists) and its BlockInputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.engine.blockwise import capture_layer_inputs
    from qtool.methods.base import BlockInputs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    hidden, calls = capture_layer_inputs(model, model.model.layers, torch.randint(0, 64, (3, 16)))
    return model.model.layers[0], BlockInputs("model.layers.0", hidden, calls[0], torch.device("cpu"))


@pytest.mark.parametrize("name", [n for n, c in METHODS if isinstance(c, type) and hasattr(c, "quantize_block")])
def test_block_method_contract(name):
    """Every block-level method: one QuantizedWeight per requested linear, in the spec's grid and
    scale dtype; replaced tensors name the block's own state; stats are JSON scalars; and the block
    carrying the result (replacements + dequantized weights) computes finite outputs close to the float block's."""
    from qtool.methods.base import BlockResult

    block, inputs = _tiny_block()
    cls = METHODS.get(name)
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls.params)} if getattr(cls, "params", None) else set()
    method = cls(**({"iters": 8} if "iters" in fields else {}))  # iterating methods: a few steps prove the contract
    linears = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    sym = getattr(cls, "default_symmetric", True)
    specs = {m: LayerSpec(f"model.layers.0.{m}.weight", get_qtype("int4"), "group", 32, sym, torch.bfloat16) for m in linears}
    float_out = inputs.run(block)
    shapes = {m: tuple(block.get_submodule(m).weight.shape) for m in linears}
    keys = set(block.state_dict())
    result = method.quantize_block(block, inputs, specs, float_out if cls.wants_targets else None, lambda *a: None)
    assert isinstance(result, BlockResult) and set(result.quantized) == set(linears)
    for m, qw in result.quantized.items():
        if getattr(cls, "weight_kind", None) == "codebook":  # AQLM: codebook scheme and fp16 storage of its own
            assert qw.shape == shapes[m] and qw.scale.dtype == torch.float16 and int(qw.codes.max()) < 2**qw.bits
            continue
        assert isinstance(qw, QuantizedWeight) and qw.shape == shapes[m] and qw.scale.dtype == torch.bfloat16
        assert qw.symmetric == sym and qw.group_size == 32
        assert int(qw.codes.min()) >= -8 and int(qw.codes.max()) <= 7
    assert set(result.replaced) <= keys
    json.dumps(result.stats)
    with torch.no_grad():
        for k, t in result.replaced.items():
            dict(block.named_parameters())[k].copy_(t)
        for m, qw in result.quantized.items():
            block.get_submodule(m).weight.copy_(qw.dequantize(torch.float32))
    for a, b in zip(float_out, inputs.run(block)):
        assert torch.isfinite(b).all() and float((a - b).norm() / a.norm()) < 0.2


@pytest.mark.parametrize("name", METHODS.names())
def test_method_parameters_are_declared_once_and_drive_the_cli(name):
    """A method's options are its `params` dataclass: every field has a default and a help text,
    appears in `qtool quantize --help` under the method's panel, and round-trips through a recipe."""
    import dataclasses

    from conftest import invoke_cli
    from qtool.methods.base import MethodParams
    from qtool.methods.params import flag_of, resolve

    cls = METHODS.get(name)
    if cls.params is None:
        assert resolve(name, {}) == {}
        return
    assert issubclass(cls.params, MethodParams) and dataclasses.is_dataclass(cls.params)
    fields = dataclasses.fields(cls.params)
    assert fields and all(f.default is not dataclasses.MISSING and f.metadata.get("help") for f in fields)
    text = invoke_cli("quantize", "--help").output
    assert f"{name} options" in text or f"/ {name}" in text or f"{name} /" in text
    for f in fields:
        assert flag_of(f.name) in text, f.name
    full = resolve(name, {})
    assert full == dataclasses.asdict(cls.params())
    cls(**full)  # the recorded full set is accepted back
