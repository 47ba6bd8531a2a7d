"""inspect, export, eval and the model card on hqq / optimum-quanto / Quark folders (project venv;
the readers these rely on are proven against each runtime in test_hqq.py, test_quanto_format.py,
test_quark_format.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import invoke_cli
from onthefly_fixtures import otf_outputs, otf_sources  # noqa: F401
from qtool.evaluate import load_hf_model, model_from_state
from qtool.inspect import inspect_model
from qtool.model.onthefly_source import dequantized_state, onthefly_kind

PICKS = {"hqq-h4g32": "hqq", "hqq-rtn4-tied": "hqq", "quanto-h4": "quanto", "quanto-r8": "quanto", "quark-r4asym": "quark",
         "quark-fp8": "quark"}


@pytest.mark.parametrize("case", list(PICKS))
def test_inspect_reads_the_layout(otf_outputs, otf_sources, case):
    """Format, parameter counts equal to the source's, every block linear one quantized row whose
    stored bytes are the file's tensors (codes + scales + zeros/shifts)."""
    folder = otf_outputs[case]
    assert onthefly_kind(folder) == PICKS[case]
    rep = inspect_model(str(folder))
    src = inspect_model(str(otf_sources[{"hqq-rtn4-tied": "gemma2_32"}.get(case, "llama32")]))
    assert rep.format == PICKS[case] and rep.method in ("hqq", "rtn")
    assert rep.params == src.params  # the tied head of the hqq file is counted once
    q = [t for t in rep.tensors if t.quantized]
    assert len(q) == 14 and rep.params_quantized == sum(t.params for t in src.tensors if ".layers." in t.name and len(t.shape) == 2)
    if PICKS[case] != "hqq":
        stored = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
        assert rep.tensor_bytes == stored
    bits = {"hqq-h4g32": 6.0, "quark-r4asym": 4 + (32 + 4) / 32, "quanto-r8": None}.get(case)  # float32 scales
    if bits:
        assert rep.bpw_quantized == pytest.approx(bits)


@pytest.mark.parametrize("case", list(PICKS))
def test_export_to_plain_safetensors_and_eval_loader(otf_outputs, tmp_path, case):
    """export -f safetensors writes our dequantization; transformers loads it and computes what
    qtool eval's loader computes on the quantized folder (no runtime in this venv: the reader)."""
    folder = otf_outputs[case]
    r = invoke_cli("export", folder, "-f", "safetensors", "-o", tmp_path / "plain", "--json")
    assert r.exit_code == 0, r.output
    state = dequantized_state(folder, PICKS[case])
    written = load_file(tmp_path / "plain" / "model.safetensors")
    assert set(written) == set(state)
    for k, v in state.items():
        assert torch.equal(written[k], v), k
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    quant = load_hf_model(folder)
    ids = torch.arange(3, 27).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, quant(ids).logits, rtol=0, atol=1e-5)


def test_eval_scores_an_hqq_folder(tiny_byte_llama, wiki_sample, tmp_path):
    out = tmp_path / "h"
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "hqq", "-b", "4", "-g", "32", "-f", "hqq", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke_cli("eval", out, "--dataset", wiki_sample, "--base", tiny_byte_llama, "--windows", "2", "--seq-len", "64", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["perplexity"] > 1 and res["kld_mean"] > 0  # quantized: not the base model's distribution
    config = json.loads((out / "config.json").read_text())
    reference = model_from_state(config, dequantized_state(out, "hqq"), out)
    ids = torch.arange(5, 40).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(out)(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case,words", [
    ("hqq-h4g32", "AutoHQQHFModel.from_quantized("),
    ("quanto-h4", "QuantizedModelForCausalLM.from_pretrained("),
    ("quark-r4asym", "`amd-quark` installed"),
])
def test_model_card_says_how_to_load(otf_outputs, case, words):
    card = (otf_outputs[case] / "README.md").read_text()
    assert words in card
    if case != "quark-r4asym":
        assert "AutoModelForCausalLM.from_pretrained" not in card
