"""`-f gptq`: the GPTQ layout (qweight / qzeros / scales / g_idx), proven by its consumer.

Layout tests run in the project venv. The consumer test loads our output with stock transformers
through `optimum` + `gptqmodel` (GPTQModel's CPU kernels), which live in their own venv,
`.cache/gptq-venv` (they pin numpy etc. differently from ours); see `make gptq-venv`. It is skipped,
saying so, where that venv is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool.core.affine import quantize_int
from qtool.formats.gptq import pack_gptq, read_dequantized, read_quantized, unpack_gptq
from qtool.qtypes import get_qtype
from tiny_models import build_tiny, build_tiny_with_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GPTQ_PY = Path(os.environ.get("QTOOL_CACHE", ROOT / ".cache")) / "gptq-venv" / "bin" / "python"


def _run_cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq_src")
    models = {arch: build_tiny(arch, root / arch) for arch in ("llama", "qwen2")}
    models["llama-bytes"] = build_tiny_with_byte_tokenizer(root / "llama-bytes")
    return models


# -- the layout, in the project venv ---------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["g32", "g64-partial", "channel", "act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_pack_unpack_round_trip(bits, layout, sym):
    torch.manual_seed(bits)
    w = torch.randn(40, 96).to(torch.bfloat16)  # 40 outputs: not a multiple of 32 (qzeros padding)
    strategy, g = ("channel", None) if layout == "channel" else ("group", 64 if "64" in layout else 32)
    qw = quantize_int(w, get_qtype(f"int{bits}"), strategy=strategy, group_size=g, symmetric=sym)
    if layout == "act-order":
        qw.g_idx = torch.randperm(96) % qw.n_groups  # any column -> group map
    fmt = "gptq" if sym else "gptq_v2"
    t = pack_gptq(qw, fmt)
    G = qw.n_groups
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
    assert t["qweight"].shape == (-(-96 * bits // 32), 40)
    assert t["qzeros"].shape == (G, -(-40 * bits // 32))
    assert t["scales"].shape == (G, 40) and t["scales"].dtype == torch.float16
    back = unpack_gptq(t, bits, fmt, g or -1)
    assert torch.equal(back.codes, qw.codes)
    assert (back.zero_point is None) == sym
    if not sym:
        assert torch.equal(back.zero_point, qw.zero_point)
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=0, atol=0)


def test_v1_words_by_hand():
    """4-bit symmetric v1: codes q + 8 packed 8 per word from the low nibble, down the input dim;
    every stored zero point is 8 - 1 = 7 (0x77777777)."""
    qt = get_qtype("int4")
    codes = (torch.arange(16, dtype=torch.int8) - 8).repeat(2, 2)[:, :32]  # [2, 32]: -8..7, -8..7
    from qtool.core.qweight import QuantizedWeight

    qw = QuantizedWeight(qt, codes, torch.ones(2, 1, dtype=torch.bfloat16), None, "group", 32)
    t = pack_gptq(qw, "gptq")
    assert t["qweight"].shape == (4, 2)
    assert [w & 0xFFFFFFFF for w in t["qweight"][:, 0].tolist()] == [0x76543210, 0xFEDCBA98] * 2
    assert t["qzeros"].tolist() == [[0x77]]  # two outputs: 2 nibbles of 7
    assert t["g_idx"].tolist() == [0] * 32


# -- refusals, before anything is written ----------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--qtype", "fp8"], ["gptq", "fp8"]),
        (["-b", "4", "-g", "48"], ["48", "16, 32, 64"]),
        (["-b", "3", "-g", "32"], ["k_proj", "multiples of 32"]),  # k_proj is 48 x 96
        (["-b", "4", "-g", "32", "--ignore", "model.layers.0.mlp.down_proj"], ["down_proj", "every block"]),
    ],
    ids=["fp8", "group-48", "int3-width-48", "ignore-one-block"],
)
def test_refusals(tiny, tmp_path, args, words):
    p = _run_cli("quantize", tiny["llama"], "-m", "rtn", *args, "-f", "gptq", "-o", tmp_path / "q")
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and all(w in p.stderr for w in words), p.stderr
    assert not (tmp_path / "q").exists()


# -- the consumer: stock transformers + optimum + gptqmodel ------------------------------------------
CASES = {
    # id: (arch, args, GPTQModel kernel that transformers picks on CPU)
    "int4-g32": ("llama", ["-b", "4", "-g", "32"], "TorchAtenLinear"),
    "int4-g64-partial": ("llama", ["-b", "4", "-g", "64"], "TorchLinear"),  # 96 = 64 + 32, 160 = 2*64 + 32
    "int4-g32-asym": ("llama", ["-b", "4", "-g", "32", "--asym"], "TorchAtenLinear"),
    "int8-channel": ("llama", ["-b", "8"], "TorchLinear"),
    "int3-g32": ("llama", ["-b", "3", "-g", "32", "--ignore", "*k_proj", "--ignore", "*v_proj"], "TorchLinear"),
    "int2-g32-asym-bias": ("qwen2", ["-b", "2", "-g", "32", "--asym"], "TorchLinear"),
    # the GPTQ method itself, act-order with dynamic groups: a real g_idx through GPTQModel
    "gptq-int4-g32-act-order": (
        "llama-bytes",
        ["-m", "gptq", "-b", "4", "-g", "32", "--act-order", "--dataset", "{text}", "--samples", "4", "--seq-len", "32"],
        None,
    ),
}


@pytest.fixture(scope="module")
def consumed(tiny, tmp_path_factory):
    """Quantize every case, then load them all in one GPTQ-venv process."""
    if not GPTQ_PY.exists():
        pytest.skip(f"{GPTQ_PY} missing: `make gptq-venv` installs transformers + optimum + gptqmodel there")
    root = tmp_path_factory.mktemp("gptq_out")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    outs = {}
    for case, (arch, args, _) in CASES.items():
        out = root / case
        method = [] if "-m" in args else ["-m", "rtn"]
        args = [a.replace("{text}", str(text)) for a in args]
        p = _run_cli("quantize", tiny[arch], *method, *args, "-f", "gptq", "-o", out, "-q")
        assert p.returncode == 0, p.stderr
        outs[case] = out
    result = root / "consumer.pt"
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [str(GPTQ_PY), str(ROOT / "tests" / "gptq_consumer.py"), str(result), *map(str, outs.values())],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(result)
    return {case: (outs[case], got[str(out)]) for case, out in outs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_gptqmodel_loads_our_output(consumed, tiny, case):
    from transformers import AutoModelForCausalLM

    arch, args, kernel = CASES[case]
    out, got = consumed[case]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == ("gptq_v2" if "--asym" in args else "gptq")
    if kernel is not None:
        assert got["kernels"] == [kernel]
    if "--act-order" in args:
        assert qcfg["desc_act"] is True
        qws, _ = read_quantized(out)
        assert any(not torch.equal(q.g_idx, torch.arange(q.shape[1]) // 32) for q in qws.values() if q.g_idx is not None)
    qws, _ = read_quantized(out)
    assert set(got["weights"]) == set(qws)
    # 1. the weight each kernel computes with is our reference dequantization ((q - z) * s from the
    #    stored fp16 scales), rounded to bf16: bit-exact where the kernel computes (q - z) * s, within
    #    one bf16 rounding where it computes q*s - z*s (asymmetric TorchAten)
    state = read_dequantized(out)
    for name, w in got["weights"].items():
        ref = state[name + ".weight"]
        torch.testing.assert_close(w, ref.to(torch.bfloat16).float(), rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    # 2. the logits equal those of the original model carrying our dequantized weights, both in bf16
    #    (summation order differs: ~0.04 on logits ~3 here, against ~0.9 from quantization itself)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32)
    result = ref_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    with torch.no_grad():
        want = ref_model.to(torch.bfloat16)(got["ids"]).logits[0].float()
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0.1)
