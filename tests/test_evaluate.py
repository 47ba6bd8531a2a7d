"""qtool.evaluate: the perplexity protocol every bench row shares."""

from __future__ import annotations

import math

import pytest
import torch

from qtool import evaluate


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_calibration_and_evaluation_halves_never_overlap(tmp_path):
    text = "".join(f"line {i}\n" for i in range(101))
    calib, held_out = evaluate.split_text(text)
    assert calib + held_out == text and calib.endswith("\n")
    assert not set(calib.splitlines()) & set(held_out.splitlines())
    p = tmp_path / "t.txt"
    p.write_text(text)
    assert evaluate.text_part(p, "eval") == held_out and evaluate.text_part(p, "calib") == calib
    with pytest.raises(ValueError, match="part"):
        evaluate.text_part(p, "train")


def test_windows_are_non_overlapping_and_the_tail_is_dropped():
    class CharTokenizer:
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 50 for c in text]}

    w = evaluate.token_windows(CharTokenizer(), "abcdefghij" * 3, seq_len=7)
    assert w.shape == (4, 7)
    assert w.flatten().tolist() == [ord(c) % 50 for c in ("abcdefghij" * 3)[:28]]
    assert evaluate.token_windows(CharTokenizer(), "x" * 100, seq_len=10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="not enough"):
        evaluate.token_windows(CharTokenizer(), "abc", seq_len=7)


def test_perplexity_is_deterministic_and_independent_of_batch_size(tiny_lm):
    windows = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(1))
    a = evaluate.perplexity(tiny_lm, windows, batch_size=1)
    b = evaluate.perplexity(tiny_lm, windows, batch_size=4)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)  # float32 matmuls batched differently
    assert math.isfinite(a.perplexity)
    assert 20 < a.perplexity < 120  # an untrained 50-token model is near uniform (ppl ~ 50)
    # the definition: exp of the mean next-token NLL over n * (seq_len - 1) predictions
    with torch.no_grad():
        logits = tiny_lm(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), windows[:, 1:].reshape(-1))
    assert a.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)
