"""Smoke tests of the llama.cpp harness (tests/llama_cpp_tools.py) on the real SmolLM2 GGUF: the
binding's logits agree with transformers reading the same file, and llama.cpp's own converter and
llama-quantize work. llama.cpp is built once per machine (`make llama-cpp`); the fixture builds it
if missing."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CACHE
from llama_cpp_tools import (
    ensure_binding,
    ensure_llama_cpp,
    gguf_next_token_logits,
    llama_tokenize,
)

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"

# Tolerances, measured against transformers reading the same GGUF (weights dequantized to float32,
# float32 matmuls), on this prompt and a 17-token one:
# * Q4_1 file as is: llama.cpp multiplies Q4_1 weights with activations quantized to Q8_1 (8 bits
#   per 32-block), so the logits carry that rounding through 30 layers: max |diff| 1.36 and 1.16,
#   mean 0.28 and 0.21 (logit std ~3, range -35..29), KL <= 0.034, argmax equal at every position.
# * the same weights requantized to F32 by llama-quantize: activations stay float (KV cache f16):
#   max |diff| 0.019 and 0.037. So the gap above is llama.cpp's arithmetic, not a misread tensor; a
#   wrong layout or scale moves logits by several units.
Q4_1_MAX_ATOL, Q4_1_MEAN_ATOL = 2.5, 0.5
F32_MAX_ATOL = 0.1


@pytest.fixture(scope="module")
def tools():
    ensure_binding(CACHE)
    return ensure_llama_cpp(CACHE)


@pytest.fixture(scope="module")
def smollm2_gguf():
    from qtool.model.smollm2 import ensure_smollm2_gguf

    return ensure_smollm2_gguf(CACHE)


@pytest.fixture(scope="module")
def hf_from_gguf(smollm2_gguf):
    """transformers' reading of the same GGUF (weights dequantized to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return tok, model


def test_tokenizer_matches_transformers(tools, smollm2_gguf, hf_from_gguf):
    tok, _ = hf_from_gguf
    ids = llama_tokenize(smollm2_gguf, PROMPT, add_bos=False)
    assert ids == tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(llama_tokenize(smollm2_gguf, " Paris", add_bos=False)) == 1


def _transformers_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_logits_match_transformers_and_say_paris(tools, smollm2_gguf, hf_from_gguf):
    tok, model = hf_from_gguf
    ids = llama_tokenize(smollm2_gguf, PROMPT, add_bos=False)
    ours = gguf_next_token_logits(smollm2_gguf, ids)
    assert ours.shape == (len(ids), model.config.vocab_size) and ours.dtype == np.float32

    paris = llama_tokenize(smollm2_gguf, " Paris", add_bos=False)[0]
    assert int(ours[-1].argmax()) == paris, tok.decode([int(ours[-1].argmax())])

    diff = np.abs(ours - _transformers_logits(model, ids))
    print(f"Q4_1: llama.cpp vs transformers |logit diff| max {diff.max():.4f} mean {diff.mean():.4f}")
    assert diff.max() < Q4_1_MAX_ATOL and diff.mean() < Q4_1_MEAN_ATOL
    assert (ours.argmax(-1) == _transformers_logits(model, ids).argmax(-1)).all()


def test_f32_requantized_logits_match_transformers_closely(tools, smollm2_gguf, hf_from_gguf, tmp_path):
    """llama-quantize --allow-requantize to F32: same weights, no activation quantization."""
    _, model = hf_from_gguf
    f32 = tools.quantize_gguf(smollm2_gguf, tmp_path / "smollm2-f32.gguf", "F32", "--allow-requantize")
    ids = llama_tokenize(f32, PROMPT, add_bos=False)
    diff = np.abs(gguf_next_token_logits(f32, ids) - _transformers_logits(model, ids))
    print(f"F32: llama.cpp vs transformers |logit diff| max {diff.max():.4f}")
    assert diff.max() < F32_MAX_ATOL


def test_convert_and_quantize_q8_0(tools, smollm2_dir, tmp_path):
    """llama.cpp's converter turns the bf16 folder into a BF16 GGUF and llama-quantize makes Q8_0
    of it, which the binding loads and which still says " Paris"."""
    import gguf

    bf16 = tools.convert_hf(smollm2_dir, tmp_path / "smollm2-bf16.gguf", "bf16")
    q8 = tools.quantize_gguf(bf16, tmp_path / "smollm2-q8_0.gguf", "Q8_0")

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert sum(t == gguf.GGMLQuantizationType.Q8_0 for t in types.values()) >= 7 * 30  # 7 matrices x 30 layers

    ids = llama_tokenize(q8, PROMPT, add_bos=False)
    logits = gguf_next_token_logits(q8, ids)
    assert int(logits[-1].argmax()) == llama_tokenize(q8, " Paris", add_bos=False)[0]
