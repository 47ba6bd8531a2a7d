"""`-m aqlm --finetune` (methods/aqlm_finetune.py): after a block is coded, its codebooks, scales and
norms are tuned against the float block's outputs, codes fixed. Checked from the written files, on
a tiny seeded 2-block llama with the calibration windows the runs used: block 0's output error
against the float model is lower with fine-tuning, block 0's codes are the same as without it, and
its norms (written as changed float tensors) moved. The aqlm consumer loading a fine-tuned file is
tests/test_aqlm_format.py (its 2x8 case), resuming one tests/test_resume.py ("aqlm-finetune")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import invoke_cli
from qtool.formats.aqlm import read_quantized
from qtool.formats.hf_quantized import read_dequantized

CALIB = ["--samples", "8", "--seq-len", "32"]
FAST = ["-m", "aqlm", "-f", "aqlm", "--steps", "1", "--codebook-steps", "10", "--kmeans-iters", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_with_byte_tokenizer

    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("aqlm_ft_src") / "tiny", hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, wiki_sample, tiny):
    root = tmp_path_factory.mktemp("aqlm_ft")
    outs = {}
    # lr 1e-3: with 8 samples (4 Adam steps) the default 1e-4 moves the norms by less than a bf16 ulp
    for name, extra in {"plain": [], "finetune": ["--finetune", "--finetune-epochs", "2"]}.items():
        r = invoke_cli("quantize", tiny, *FAST, *extra, "--dataset", wiki_sample, *CALIB, "-o", root / name, "-q")
        assert r.exit_code == 0, r.output
        outs[name] = root / name
    return tiny, outs


def block0_mse(tiny: Path, folder: Path, ids: torch.Tensor) -> float:
    """Mean squared error of decoder block 0's output, the quantized model's vs the float one's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[1]
        assert not model.load_state_dict(read_dequantized(folder), strict=False).unexpected_keys
        got = model(ids, output_hidden_states=True).hidden_states[1]
    return float(((got - want) ** 2).mean())


def test_finetune_lowers_the_block_output_error_with_the_codes_fixed(runs, wiki_sample):
    from qtool.config import make_recipe
    from qtool.model.resolve import open_source
    from qtool.pipeline import load_calibration_for

    tiny, outs = runs
    recipe = make_recipe(method="aqlm", bits=None, qtype=None, group_size=None, asym=False, fmt="aqlm",
                         dataset=str(wiki_sample), samples=8, seq_len=32)
    with open_source(str(tiny)) as source:
        ids = load_calibration_for(source, recipe).input_ids  # the windows both runs calibrated on
    plain, tuned = block0_mse(tiny, outs["plain"], ids), block0_mse(tiny, outs["finetune"], ids)
    assert tuned < 0.97 * plain, (tuned, plain)
    qp, rest_p = read_quantized(outs["plain"])
    qt, rest_t = read_quantized(outs["finetune"])
    for m in [k for k in qp if k.startswith("model.layers.0.")]:
        assert torch.equal(qp[m].codes, qt[m].codes), m  # fine-tuning never touches the codes
        assert not torch.equal(qp[m].codebooks, qt[m].codebooks), m
    for norm in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert not torch.equal(rest_p[norm], rest_t[norm]), norm
    assert torch.equal(rest_p["model.norm.weight"], rest_t["model.norm.weight"])  # outside the blocks: untouched


def test_finetune_parameters_are_checked(tmp_path, wiki_sample, tiny):
    for args, word in ((["--finetune-epochs", "0"], "--finetune-epochs"), (["--finetune-lr", "5"], "--finetune-lr")):
        r = invoke_cli("quantize", tiny, *FAST, "--finetune", *args, "--dataset", wiki_sample, *CALIB, "-o", tmp_path / "x")
        assert r.exit_code == 2 and word in r.output, r.output
    # statistics alone (`qtool calibrate`) hold no block inputs to tune on: refused before any work
    r = invoke_cli("calibrate", tiny, "--dataset", wiki_sample, *CALIB, "-o", tmp_path / "st.safetensors", "-q")
    assert r.exit_code == 0, r.output
    r = invoke_cli("quantize", tiny, *FAST, "--finetune", "--stats", tmp_path / "st.safetensors", "-o", tmp_path / "y")
    assert r.exit_code == 2 and "need calibration data run through the model" in r.output, r.output
    assert not (tmp_path / "y").exists()


def test_finetune_over_two_ranks_against_one_process(runs, wiki_sample, tmp_path):
    """`--finetune --nproc 2`: each rank holds 4 of the 8 windows; the Adam steps take the gradients
    summed over the ranks (methods/aqlm_finetune.py). The codes come from the same all-reduced
    Hessians, so they equal one process's; the tuned codebooks, scales and norms differ from one
    process's only by the order of the gradient sums, below what their float16 / bf16 storage holds
    (measured: every stored tensor equal). Asserted: codes equal, the rest within 2 float16 ulps of
    its largest value, and fine-tuning did move the codebooks (not the plain run's)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    tiny, outs = runs
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(tiny), *FAST, "--finetune", "--finetune-epochs", "2",
                        "--dataset", str(wiki_sample), *CALIB, "-o", str(tmp_path / "two"), "-q", "--nproc", "2"],
                       capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT), "QTOOL_DEBUG": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    one, rest1 = read_quantized(outs["finetune"])
    two, rest2 = read_quantized(tmp_path / "two")
    plain, _ = read_quantized(outs["plain"])

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a.float() - b.float()).abs().max()) <= 2 * 2.0 ** -10 * float(a.float().abs().max())

    assert one.keys() == two.keys() and rest1.keys() == rest2.keys()
    for m in one:
        assert torch.equal(one[m].codes, two[m].codes), m
        assert close(one[m].codebooks, two[m].codebooks) and close(one[m].scales, two[m].scales), m
    assert all(close(rest1[k], rest2[k]) for k in rest1)
    assert not torch.equal(plain["model.layers.0.mlp.down_proj"].codebooks, two["model.layers.0.mlp.down_proj"].codebooks)
