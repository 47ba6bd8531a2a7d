"""compressed-tensors output on the real model, proven by its consumer: transformers (with the
compressed-tensors package) loads our folder, and its logits equal those of the original model
carrying *our* dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch

from qtool.formats.compressed_tensors import read_dequantized

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def tokens(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def quantized(smollm2_dir, tmp_path_factory):
    """quantized(*args) -> (folder, --json report); each recipe is quantized once per module."""
    from typer.testing import CliRunner

    from qtool.cli.main import app

    made: dict[tuple, tuple] = {}

    def get(*args: str):
        if args not in made:
            out = tmp_path_factory.mktemp("ct") / "q"
            r = CliRunner().invoke(app, ["quantize", str(smollm2_dir), *args, "-o", str(out), "--json", "-q"])
            assert r.exit_code == 0, r.output
            made[args] = (out, json.loads(r.stdout))
        return made[args]

    return get


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def _reference_logits(model_dir, out, ids, dtype=torch.float32):
    """The original architecture with our dequantized weights (rounded to `dtype`)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.to(dtype).float() for k, v in read_dequantized(out).items()}
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all("lm_head" in k for k in result.missing_keys)  # lm_head is tied
    return _logits(ref, ids)


@pytest.mark.parametrize(
    "args",
    [["-b", "4", "-g", "64"], ["-b", "8"], ["--qtype", "fp8"], ["-b", "4", "-g", "128"]],
    ids=["int4-g64", "int8-channel", "fp8-channel", "int4-g128-adapted"],
)
def test_transformers_loads_our_output_and_predicts_our_logits(quantized, smollm2_dir, tokens, args):
    from transformers import AutoModelForCausalLM

    out, report = quantized(*args)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the default route
    got = _logits(model, tokens)
    want = _reference_logits(smollm2_dir, out, tokens)
    # Both sides dequantize (q - z) * s in fp32 from the same bf16 scales: identical weights, so only
    # matmul summation order could differ. 1e-4 absolute on logits of magnitude ~20.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert report["params_quantized"] == 106_168_320  # the 210 Linear layers in the 30 blocks
    if "128" in args:
        # 576 is not a multiple of 128: the model gets one group size that divides every width
        # (64), visibly, so that every transformers loading route takes it
        assert any("group size 64 instead of 128: 576" in n for n in report["notes"]), report["notes"]
        assert {layer["group_size"] for layer in report["layers"]} == {64}


def test_asymmetric_output_loads_through_the_dequantize_route(quantized, smollm2_dir, tokens):
    """transformers 5.23 + compressed-tensors 0.20 cannot load asymmetric pack-quantized zero points
    through the default route (a zero-point shape mismatch upstream), so we load with
    CompressedTensorsConfig(dequantize=True), which materialises weights in the checkpoint dtype
    (bf16): our reference is our dequantization rounded to bf16."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, _ = quantized("-b", "4", "-g", "64", "--asym")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    got = _logits(model, tokens)
    want = _reference_logits(smollm2_dir, out, tokens, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_quantized_model_still_predicts_like_the_original(quantized, smollm2_dir, tokens):
    """Lossy check on a real trained model: int8 per-channel keeps the next-token distribution."""
    from transformers import AutoModelForCausalLM

    out, _ = quantized("-b", "8")
    q = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens), -1)
    p = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), tokens), -1)
    kld = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kld < 0.01, kld  # int8 per channel: KL ~1e-3 on a 135M model; 0.01 leaves room, catches breakage
    assert (p.argmax(-1) == q.argmax(-1)).float().mean() > 0.9


def test_output_records_how_it_was_made(quantized):
    out, _ = quantized("-b", "4", "-g", "64")
    record = json.loads((out / "qtool.json").read_text())
    assert record["recipe"]["qtype"] == "int4" and record["recipe"]["group_size"] == 64
    assert len(record["inputs"]["model.safetensors"]["sha256"]) == 64
    assert {"qtool", "torch", "transformers"} <= set(record["versions"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*qtool-partial*"))
