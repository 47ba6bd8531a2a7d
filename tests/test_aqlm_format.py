"""`-f aqlm`: the files `-m aqlm` writes, judged by the program that consumes them: stock transformers
5.23 + aqlm[cpu] 1.1.7 in the isolated `$QTOOL_CACHE/aqlm-venv` (`make aqlm-venv`), loading on CPU in
float32 (tests/aqlm_consumer.py). Each quantized module's computed weight and the model's logits are
compared with qtool's own dequantization (formats/aqlm.py `read_quantized`).

Kernels: 1x16 runs aqlm's pure-torch `dequantize_gemm`; 2x8 (256-entry codebooks) the numba kernel
`numba_gemm_lut`, whose `prange` over input groups adds into one shared output vector
(`output_vec[i] += ...` from every thread: a data race), so the consumer runs with
NUMBA_NUM_THREADS=1 to compute the kernel's intended result deterministically."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli
from qtool.formats.aqlm import pack_codes, read_quantized, unpack_codes
from qtool.formats.hf_quantized import read_dequantized
from tiny_models import build_tiny_with_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
AQLM_PY = Path(os.environ.get("QTOOL_CACHE", ROOT / ".cache")) / "aqlm-venv" / "bin" / "python"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
FAST = ["--steps", "1", "--codebook-steps", "10", "--kmeans-iters", "3"]
CASES = {  # scheme -> (quantize args, the aqlm kernel that runs it on CPU)
    # 2x8 also block-fine-tuned: its tuned codebooks and changed norms are what the consumer loads
    "2x8": (["--codebooks", "2", "--codebook-bits", "8", "--steps", "2", "--finetune", "--finetune-epochs", "2"], "numba_gemm_lut"),
    "1x16": (["--codebooks", "1", "--codebook-bits", "16", *FAST], "dequantize_gemm"),
}


def test_codes_are_stored_as_twos_complement():
    for bits, dtype in ((8, torch.int8), (16, torch.int16), (12, torch.int16), (4, torch.int8)):
        codes = torch.tensor([0, 1, 2 ** (bits - 1) - 1, 2 ** (bits - 1), 2**bits - 1], dtype=torch.int32)
        stored = pack_codes(codes, bits)
        assert stored.dtype == dtype
        assert stored.tolist()[:3] == codes.tolist()[:3] and stored.tolist()[3:] == [-(2 ** (bits - 1)), -1]
        assert torch.equal(unpack_codes(stored, bits), codes)


def test_codebook_overhead_is_said_where_codebooks_outweigh_codes():
    """1x16 on SmolLM2-135M's layers: 7 codebooks of 65,536 x 8 fp16 values per block over its 3.54 M
    weights are ~16.6 bits per weight on top of the codes' 2, which the run report says; 2x8 adds 0.13: silent."""
    from qtool.formats.aqlm import codebook_bits_per_weight, codebook_overhead_note

    block = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576), "up": (1536, 576),
             "down": (576, 1536)}
    shapes = {f"model.layers.{b}.{m}": s for b in range(30) for m, s in block.items()}
    assert codebook_bits_per_weight(shapes, 1, 16, 8) == pytest.approx(7 * 65536 * 8 * 16 / 3_538_944)
    note = codebook_overhead_note(shapes, 1, 16, 8)
    assert note is not None and "add 16.59 bits per weight to the codes' 2.00" in note and "192 x 576" in note
    assert "2x8 would add 0.13" in note
    assert codebook_overhead_note(shapes, 2, 8, 8) is None
    wide = {f"l{i}": (4096, 4096) for i in range(7)}  # a 7B's attention projections: 1x16 adds 0.5
    assert codebook_bits_per_weight(wide, 1, 16, 8) == pytest.approx(0.5) and codebook_overhead_note(wide, 1, 16, 8) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("aqlm_src") / "tiny", **TINY)


@pytest.fixture(scope="module")
def outputs(tiny, tmp_path_factory, wiki_sample):
    root = tmp_path_factory.mktemp("aqlm_out")
    outs = {}
    for case, (args, _) in CASES.items():
        r = invoke_cli("quantize", tiny, "-m", "aqlm", "-f", "aqlm", *args, "--dataset", wiki_sample, "--samples", "4",
                       "--seq-len", "32", "-o", root / case, "-q")
        assert r.exit_code == 0, r.output
        outs[case] = root / case
    return outs


@pytest.fixture(scope="module")
def consumed(outputs, tmp_path_factory):
    if not AQLM_PY.exists():
        pytest.fail(f"{AQLM_PY} missing: `make aqlm-venv` installs transformers + aqlm[cpu] there (make test does)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NUMBA_NUM_THREADS": "1"}  # the 2x8 kernel races on > 1 thread
    env.pop("PYTHONPATH", None)
    out = tmp_path_factory.mktemp("aqlm_consumer") / "got.pt"
    p = subprocess.run([str(AQLM_PY), str(ROOT / "tests" / "aqlm_consumer.py"), str(out), *map(str, outputs.values())],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(out)
    return {case: got[str(folder)] for case, folder in outputs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_layout(outputs, case):
    cfg = json.loads((outputs[case] / "config.json").read_text())["quantization_config"]
    M, B = map(int, case.split("x"))
    assert cfg == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": M,
                   "nbits_per_codebook": B, "linear_weights_not_to_quantize": ["lm_head", "model.embed_tokens"]}
    qws, rest = read_quantized(outputs[case])
    assert len(qws) == 7 and "lm_head.weight" in rest and "model.embed_tokens.weight" in rest
    qw = qws["model.layers.0.mlp.down_proj"]
    assert qw.shape == (64, 128) and qw.codes.shape == (64, 16, M) and qw.codebooks.shape == (M, 2**B, 8)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_and_aqlm_compute_our_dequantization(consumed, outputs, tiny, case):
    from transformers import AutoModelForCausalLM

    got = consumed[case]
    assert got["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert len(got["kernels"]) == 7 and set(got["kernels"].values()) == {f"QuantizedLinear/{CASES[case][1]}"}
    state = read_dequantized(outputs[case])
    for name, w in got["weights"].items():  # the weight each module's own kernel computes with
        torch.testing.assert_close(w, state[name + ".weight"], rtol=1e-5, atol=1e-6)
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    orig = ref(got["ids"]).logits[0].detach()
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    with torch.no_grad():
        want = ref(got["ids"]).logits[0]
    assert torch.isfinite(got["logits"]).all()
    diff = float((got["logits"] - want).abs().max())
    assert diff < 1e-4 * float(want.abs().max())  # summation order only
    assert diff < 0.01 * float((orig - want).abs().max())  # the quantization error is far larger: a wrong layout fails


@pytest.mark.parametrize("case, label", [("2x8", "aqlm 2x8 g8"), ("1x16", "aqlm 1x16 g8")])
def test_inspect_counts_codebooks_in_bits_per_weight(outputs, case, label):
    """On a layer this small the codebooks dominate (2x8: 10.25 bits per weight, 1x16: 1026): said, not hidden."""
    from qtool.inspect import inspect_model

    rep = inspect_model(str(outputs[case]))
    rows = {t.name: t for t in rep.tensors}
    q = rows["model.layers.0.mlp.up_proj.weight"]
    assert q.quantized and q.type == label and q.shape == (128, 64)
    M, B = map(int, case.split("x"))
    want = (128 * 8 * M * B / 8 + M * 2**B * 8 * 2 + 128 * 2) * 8 / (128 * 64)  # codes + fp16 codebooks + fp16 scales
    assert q.bits == pytest.approx(want) and want > M * B / 8  # codes alone: 2 bits
    assert rows["lm_head.weight"].type == "BF16" and not rows["lm_head.weight"].quantized


def test_export_dequantizes(outputs, tmp_path):
    from safetensors.torch import load_file

    r = invoke_cli("export", outputs["2x8"], "-f", "safetensors", "-o", tmp_path / "plain", "-q")
    assert r.exit_code == 0, r.output
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    want = read_dequantized(outputs["2x8"], torch.bfloat16)
    assert plain.keys() == want.keys() and all(torch.equal(plain[k], want[k]) for k in want)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_refusals(tiny, tmp_path, wiki_sample):
    calib = ["--dataset", wiki_sample, "--samples", "2", "--seq-len", "16"]
    r = invoke_cli("quantize", tiny, "-m", "gptq", "-f", "aqlm", *calib, "-o", tmp_path / "a")
    assert r.exit_code == 3 and "use -m aqlm" in r.output
    r = invoke_cli("quantize", tiny, "-m", "aqlm", "-f", "gptq", *calib, "-o", tmp_path / "b")
    assert r.exit_code == 3 and "--format aqlm" in r.output
    r = invoke_cli("quantize", tiny, "-m", "aqlm", "-f", "aqlm", "--in-group", "48", *calib, "-o", tmp_path / "c")
    assert r.exit_code == 3 and "is not a multiple of --in-group 48" in r.output and "1, 2, 4, 8, 16, 32" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "c").exists()
