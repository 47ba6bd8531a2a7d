"""`qtool eval` of W4 folders that used to be dequantized into a dense float32 model (GPTQ without
optimum + gptqmodel, asymmetric compressed-tensors) runs them from their packed weights: the same
logits as the dense dequantized model, and as transformers + compressed-tensors' own
dequantizing loader, without holding a dense copy of the quantized linears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli
from qtool import evaluate
from qtool.kernels.packed_model import Int4Linear, load_packed_int4, packable
from tiny_models import build_tiny_with_byte_tokenizer

LINEARS = 14  # tiny llama: 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    base = build_tiny_with_byte_tokenizer(root / "tiny")  # a tokenizer, so that `qtool eval` runs
    out = {"base": base}
    for name, args in {"gptq": ["-f", "gptq"], "gptq-asym": ["-f", "gptq", "--asym"],
                       "ct-asym": ["-f", "compressed-tensors", "--asym"]}.items():
        r = invoke_cli("quantize", base, "-m", "rtn", "-b", "4", "-g", "32", *args, "-o", root / name, "--json")
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


def dense_model(folder: Path):
    """The dense float32 model qtool's readers dequantize the folder into (the old eval route)."""
    config = json.loads((folder / "config.json").read_text())
    if config["quantization_config"]["quant_method"] == "gptq":
        return evaluate.load_gptq_dequantized(folder, config)
    from qtool.formats.compressed_tensors import read_dequantized

    return evaluate.model_from_state(config, read_dequantized(folder), folder)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["gptq", "gptq-asym", "ct-asym"])
def test_packed_model_matches_the_dense_dequantized_model(folders, name):
    folder = folders[name]
    kind = packable(folder)
    assert kind == ("gptq" if name.startswith("gptq") else "compressed-tensors")
    packed, dense = load_packed_int4(folder, kind), dense_model(folder)
    int4 = [m for m in packed.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == LINEARS
    # no dense weight behind the int4 modules: packed codes + scales + zeros, < 1 byte a weight
    weights = sum(m.in_features * m.out_features for m in int4)
    held = sum(b.numel() * b.element_size() for m in int4 for b in m.buffers())
    assert held < weights
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    # 80 rows of float32: the reference kernel, the very dequantization of the dense route -> exact
    assert torch.equal(logits(packed, ids), logits(dense, ids))
    # 5 rows: ATen's int4 CPU kernel (float32 sums in another order): 1e-5 of the logits' scale
    short = ids[:1, :5]
    want = logits(dense, short)
    assert (logits(packed, short) - want).abs().max() <= 1e-5 * want.abs().max()


def test_packed_asymmetric_ct_matches_compressed_tensors_own_loader(folders):
    """The consumer's own math: transformers + compressed-tensors, dequantizing on load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = folders["ct-asym"]
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(1))
    want = logits(theirs, ids)
    # their dequantization runs in the scale dtype (bf16) and ours in float32: 1e-2 of the scale
    assert (logits(load_packed_int4(folder, "compressed-tensors"), ids) - want).abs().max() <= 1e-2 * want.abs().max()


def test_eval_uses_the_packed_route_and_scores_like_the_dense_model(folders, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(4000)))
    model = evaluate.load_hf_model(folders["gptq-asym"])
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == LINEARS
    r = invoke_cli("eval", folders["gptq-asym"], "--dataset", text, "--part", "all", "--seq-len", "32",
                   "--windows", "3", "--json")
    assert r.exit_code == 0, r.output
    ppl = json.loads(r.stdout)["perplexity"]
    windows = evaluate.eval_windows(evaluate.load_tokenizer(folders["gptq-asym"]), text, "all", 32, 3)
    dense = evaluate.perplexity(dense_model(folders["gptq-asym"]), windows, batch_size=1).perplexity
    assert ppl == pytest.approx(dense, rel=1e-12)


def test_folders_that_need_no_dense_copy_are_left_to_their_loaders(folders):
    assert packable(folders["base"]) is None  # plain bf16
