"""`qtool export AQLM_FOLDER -f gguf -t Q8_0`: an AQLM checkpoint (-m aqlm -f aqlm) dequantized in
float32 and re-quantized to a GGUF type, the error that adds reported per tensor, the file run by
llama.cpp. The model is tiny_models' llama with SmolLM2's tokenizer (a pre-tokenizer llama.cpp
knows, so GGUF can hold it); one decoder block, 2x8 codebooks (the quick scheme)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke_cli
from qtool.core.metrics import sqnr_db
from qtool.formats.aqlm import read_quantized
from qtool.model.gguf_source import GGUFSource


@pytest.fixture(scope="module")
def made(tmp_path_factory, smollm2_dir, wiki_sample):
    """(tiny float model, its AQLM folder, the GGUF exported from it, export's --json report)."""
    from tiny_models import build_tiny_with_tokenizer_of

    root = tmp_path_factory.mktemp("aqlm_gguf")
    tiny = build_tiny_with_tokenizer_of(root / "tiny", smollm2_dir, num_hidden_layers=1)
    r = invoke_cli("quantize", tiny, "-m", "aqlm", "-f", "aqlm", "--steps", "1", "--codebook-steps", "10",
                   "--dataset", wiki_sample, "--samples", "4", "--seq-len", "32", "-o", root / "aqlm", "-q")
    assert r.exit_code == 0, r.output
    r = invoke_cli("export", root / "aqlm", "-f", "gguf", "-t", "Q8_0", "-o", root / "m.gguf", "--json")
    assert r.exit_code == 0, r.output
    return tiny, root / "aqlm", root / "m.gguf", json.loads(r.stdout)


def test_gguf_holds_the_aqlm_weights_within_q8_0_error_and_reports_it(made):
    _, folder, path, rep = made
    qws, _ = read_quantized(folder)
    back = GGUFSource(path, dtype=torch.float32)
    reported = {layer["name"]: layer for layer in rep["layers"]}
    assert len(qws) == 7 and "from aqlm: dequantized (float32)" in rep["notes"]
    assert any("re-quantization error" in n and f"{rep['sqnr_db_min']} dB" in n for n in rep["notes"])
    for prefix, qw in qws.items():
        want = qw.dequantize(torch.float32)
        got = back.get_tensor(f"{prefix}.weight")
        # Q8_0: blocks of 32, d = amax / 127 stored in fp16, x ≈ round(x / d) * d: within d/2 plus
        # 127 * (d's fp16 rounding, 2^-11 relative)
        d = want.reshape(want.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
        err = (got - want).reshape(d.shape[0], -1, 32).abs()
        assert (err <= d * (0.5 + 127 * 2.0**-11) + 1e-12).all(), prefix
        assert err.max() > 0  # re-quantized, not the AQLM weights copied as floats
        # the SQNR reported is the file's error against the exact (float32) AQLM dequantization
        row = reported[f"{prefix}.weight"]
        assert row["type"] == "Q8_0"
        assert row["sqnr_db"] == pytest.approx(sqnr_db(want, got), abs=0.01)


def test_llama_cpp_runs_the_exported_aqlm_model(made, wikitext_path):
    lct = pytest.importorskip("llama_cpp_tools")
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny, folder, path, _ = made
    ids = AutoTokenizer.from_pretrained(tiny)(wikitext_path.read_text(encoding="utf-8")[-4000:]).input_ids[:96]
    got = lct.gguf_next_token_logits(path, ids)
    back = GGUFSource(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()

    def logits(state: dict | None) -> np.ndarray:
        if state is not None:
            assert not model.load_state_dict(state, strict=False).unexpected_keys
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    base = logits(None)
    ours = logits({m.name: back.get_tensor(m.name) for m in back.tensors()})
    qws, _ = read_quantized(folder)
    aqlm = logits({f"{p}.weight": qw.dequantize(torch.float32) for p, qw in qws.items()})
    # llama.cpp's own arithmetic (8-bit activations in Q8_0 dot products) on top of the file's weights
    assert np.abs(got - ours).max() <= 0.25
    assert (got.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    # the file is the AQLM model: far closer to it than the AQLM model is to the float one
    assert np.abs(got - aqlm).max() < 0.3 * np.abs(aqlm - base).max()
