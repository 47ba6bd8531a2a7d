"""`qtool quantize -m awq -f gguf -t TYPE`: AWQ's scaled weights on each GGUF tensor's grid and its
rescaled norms in the file; llama.cpp runs it and it beats RTN of the same type. The model and
helpers are test_gptq_gguf's (tiny llama, SmolLM2's tokenizer, uneven embedding channels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_gptq_gguf import build_llama, held_out_ids, hf_logits, kl_of_block_linears, stored

SAMPLES, SEQ_LEN = 16, 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir, wikitext_path):
    root = tmp_path_factory.mktemp("awq-gguf")
    text = wikitext_path.read_text(encoding="utf-8")
    calib = root / "calib.txt"
    calib.write_text(text[:60_000], encoding="utf-8")
    return build_llama(root / "tiny", smollm2_dir), calib, text[-6000:], root


def _run(setup, method: str):
    from conftest import invoke_cli

    model, calib, _, root = setup
    out = root / f"{method}.gguf"
    if not out.exists():
        extra = ("--dataset", calib, "--samples", SAMPLES, "--seq-len", SEQ_LEN) if method == "awq" else ()
        r = invoke_cli("quantize", model, "-m", method, "-f", "gguf", "-t", "Q4_0", *extra, "-o", out, "--json", "-q")
        assert r.exit_code == 0, r.output
        (root / f"{method}.json").write_text(r.stdout)
    return out, json.loads((root / f"{method}.json").read_text())


def test_awq_gguf_beats_rtn_and_llama_cpp_runs_it(setup):
    model, _, held, _ = setup
    path, rep = _run(setup, "awq")
    assert rep["format_type"] == "Q4_0" and all(layer["sqnr_db"] is not None for layer in rep["layers"])
    state = stored(path)
    from safetensors.torch import load_file

    orig = load_file(str(model / "model.safetensors"))
    assert not torch.equal(state["model.layers.0.input_layernorm.weight"].to(torch.bfloat16), orig["model.layers.0.input_layernorm.weight"])
    ids = held_out_ids(model, held, 256)
    kl_awq = kl_of_block_linears(model, ids, path)
    kl_rtn = kl_of_block_linears(model, ids, _run(setup, "rtn")[0])
    assert kl_awq < 0.9 * kl_rtn, (kl_awq, kl_rtn)

    lct = pytest.importorskip("llama_cpp_tools")
    pytest.importorskip("llama_cpp")
    ids = ids[:128]
    got = lct.gguf_next_token_logits(path, ids)
    ours = hf_logits(model, ids, state)
    base = hf_logits(model, ids)
    # llama.cpp rounds activations to 8 bits in its Q4_0 dot products (test_gptq_gguf measured 0.094 there)
    assert np.abs(got - ours).max() <= 0.25
    assert np.abs(got - ours).max() < 0.3 * np.abs(got - base).max()
    assert (got.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
