"""`qtool eval`: perplexity, KL(base || model) and top-1 agreement, on every format qtool writes.

One tiny random llama (hidden 64, 2 layers) with SmolLM2's real tokenizer and vocabulary (49152,
so that the GGUF writer and llama.cpp see a real BPE vocabulary), saved in bf16, quantized once per
module by the CLI, then scored by the CLI on 4 windows of 64 tokens of a generated text file.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from qtool import evaluate

SEQ_LEN, WINDOWS = 64, 4
WORDS = ("the of and a to in is was for on that with as by at from his her it an were are which this be or "
         "city river album season war king song film game team").split()


def build_base(folder: Path, tokenizer_dir: Path, vocab_size: int = 49152) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, initializer_range=0.08, bos_token_id=1,
                               eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def write_text(path: Path) -> Path:
    rng = random.Random(0)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(300))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("eval")
    return {"base": build_base(root / "base", smollm2_dir), "text": write_text(root / "text.txt"), "root": root}


@pytest.fixture(scope="module")
def quantized(work):
    """quantized("-b", "8") -> output path, made once per module by `qtool quantize`."""
    from typer.testing import CliRunner

    from qtool.cli.main import app

    made: dict[tuple, Path] = {}

    def get(*args: str) -> Path:
        if args not in made:
            suffix = ".gguf" if "gguf" in args else ""
            out = work["root"] / ("q" + "".join(a.strip("-") for a in args) + suffix)
            r = CliRunner().invoke(app, ["quantize", str(work["base"]), *args, "-o", str(out), "-q"], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            made[args] = out
        return made[args]

    return get


def run_eval(cli, work, model: Path, *extra: object) -> dict:
    r = cli("eval", model, "--base", work["base"], "--dataset", work["text"], "--seq-len", SEQ_LEN,
            "--windows", WINDOWS, "--json", *extra)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["windows"] == WINDOWS and report["seq_len"] == SEQ_LEN
    assert report["tokens_scored"] == WINDOWS * (SEQ_LEN - 1)
    return report


def test_self_evaluation_is_exact(cli, work):
    """The base against itself: the same float32 arithmetic twice, so exactly 0 and exactly 1."""
    r = run_eval(cli, work, work["base"])
    assert r["kld_mean"] == 0.0 and r["top1_agreement"] == 1.0
    assert r["perplexity"] == r["base_perplexity"] and r["ppl_ratio"] == 1.0
    assert r["backend"] == "transformers"
    batched = run_eval(cli, work, work["base"], "--batch-size", 3)  # batches of 3 + 1 windows
    assert batched["kld_mean"] == 0.0 and batched["top1_agreement"] == 1.0
    assert batched["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)  # float32 batched matmuls round differently
    assert set(r) >= {"model", "base", "dataset", "windows", "seq_len", "tokens_scored", "perplexity",
                      "base_perplexity", "ppl_ratio", "kld_mean", "top1_agreement", "seconds", "backend"}


def test_perplexity_is_the_bench_protocol(cli, work, quantized):
    """The HF route scores exactly what qtool.evaluate.perplexity does on the same windows
    (same tokenizer call, same windows, same NLL arithmetic; batch size 1 on both sides, since a
    batched float32 forward may round differently)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = quantized("-b", "8")
    r = run_eval(cli, work, out)
    windows = evaluate.eval_windows(AutoTokenizer.from_pretrained(work["base"]), work["text"], "eval", SEQ_LEN, WINDOWS)
    for path, key in ((out, "perplexity"), (work["base"], "base_perplexity")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert r[key] == pytest.approx(evaluate.perplexity(model, windows, batch_size=1).perplexity, rel=1e-12), key


def test_kl_grows_as_bits_shrink(cli, work, quantized):
    """int8 per channel barely moves the distributions; int2 g32 moves them far. Measured on this
    model: KLD 5e-5 vs 0.22, agreement 0.96 vs 0.004 (a random model's distributions are nearly
    flat, so its top-1 is fragile: agreement is only compared, not bounded)."""
    w8 = run_eval(cli, work, quantized("-b", "8"))
    w2 = run_eval(cli, work, quantized("-b", "2", "-g", "32"))
    assert 0 < w8["kld_mean"] < 1e-3
    assert w2["kld_mean"] > 100 * w8["kld_mean"]
    assert w2["top1_agreement"] < w8["top1_agreement"] < 1.0


def test_asymmetric_compressed_tensors_load(cli, work, quantized):
    """`symmetric: false` checkpoints go through CompressedTensorsConfig(dequantize=True)."""
    w4 = run_eval(cli, work, quantized("-b", "4", "-g", "32", "--asym"))
    assert 0 < w4["kld_mean"] < 0.1


def test_gguf_f32_torch_backend_is_exact(cli, work, quantized):
    """F32 holds the bf16 weights exactly and the torch backend runs them in the same float32
    transformers model: KL measured exactly 0 (1e-9 allows a config value rounded through GGUF's
    float32 fields, e.g. rms_norm_eps)."""
    r = run_eval(cli, work, quantized("-f", "gguf", "-t", "F32"), "--backend", "torch")
    assert r["backend"] == "torch"
    assert r["kld_mean"] <= 1e-9 and r["top1_agreement"] == 1.0


def test_gguf_in_llama_cpp(cli, work, quantized):
    """llama.cpp runs the same F32 weights with its own kernels (other summation order, its own
    softmax-free logits): only rounding differs. Measured KLD 7e-9 and perplexity within 1.3e-5;
    1e-6 leaves room for other CPUs' SIMD paths and is still 50x below int8's KLD. Q8_0 adds
    8-bit weights (and 8-bit activations in llama.cpp's dot products): measured 1e-4."""
    pytest.importorskip("llama_cpp")
    f32 = run_eval(cli, work, quantized("-f", "gguf", "-t", "F32"), "--backend", "llama.cpp")
    assert f32["backend"] == "llama.cpp"
    assert f32["kld_mean"] < 1e-6 and f32["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    q8 = run_eval(cli, work, quantized("-f", "gguf", "-t", "Q8_0"), "--backend", "llama.cpp")
    assert 10 * f32["kld_mean"] < q8["kld_mean"] < 1e-3


def test_without_base_only_perplexity(cli, work):
    r = cli("eval", work["base"], "--dataset", work["text"], "--seq-len", SEQ_LEN, "--windows", 2, "--part", "all", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["base"] is None and report["kld_mean"] is None and report["top1_agreement"] is None
    assert report["windows"] == 2 and report["perplexity"] > 1


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_errors_are_one_line(cli, work, tmp_path):
    base, text = work["base"], work["text"]
    _one_line_error(cli("eval", tmp_path / "nope", "--dataset", text), 5, "nope", "no such file")
    _one_line_error(cli("eval", base, "--dataset", tmp_path / "none.txt"), 5, "none.txt")
    short = tmp_path / "short.txt"
    short.write_text("a few words\nand a few more\n")
    _one_line_error(cli("eval", base, "--dataset", short, "--seq-len", SEQ_LEN), 2, "too short", "--seq-len")
    _one_line_error(cli("eval", base, "--dataset", text, "--backend", "onnx"), 2, "onnx", "llama.cpp")
    other = build_base(tmp_path / "other", base, vocab_size=49216)
    _one_line_error(cli("eval", base, "--base", other, "--dataset", text, "--seq-len", SEQ_LEN, "--windows", 1),
                    2, "vocabulary sizes differ", "49152", "49216")
