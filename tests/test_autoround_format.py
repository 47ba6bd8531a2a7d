"""`-f auto-round`: AutoRound's native layout (`quant_method: auto-round`), proven by its consumer:
stock transformers + `auto-round==0.16.1` (its pure-torch `torch_zp` kernel for the symmetric
`auto_round:auto_gptq` packing; gptqmodel's AWQ torch kernel for the asymmetric `auto_round:auto_awq`
one), both in the GPTQ venv (`make autoround-venv`). Skipped, saying so, where they are missing."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from qtool.model.quantized_source import read_dequantized, read_quantized
from test_awq_format import _reference_logits, _run_cli, consume, quantize
from test_gptq_format import GPTQ_PY
from tiny_models import build_tiny, make_config, save_random


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar_src")
    cfg = make_config("llama")
    cfg.num_key_value_heads = 4  # k/v 96 wide: every width a multiple of 32, as auto-round's torch kernel needs
    return {"llama32": save_random(cfg, root / "llama32", 7), "llama": build_tiny("llama", root / "llama")}


def test_layouts(tiny, tmp_path):
    """Symmetric: GPTQ v1 tensors (zero points stored minus one, no g_idx); asymmetric: exactly the
    tensors `-f awq` writes; the config says which, and readers get the codes back."""
    sym = quantize(tiny["llama32"], tmp_path / "sym", "-b", "4", "-g", "32", "--ignore", "*o_proj", "-f", "auto-round")
    qcfg = json.loads((sym / "config.json").read_text())["quantization_config"]
    assert {k: qcfg[k] for k in ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type", "block_name_to_quantize")} == {
        "quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4, "group_size": 32, "sym": True,
        "data_type": "int", "block_name_to_quantize": "model.layers"}
    assert qcfg["extra_config"] == {f"model.layers.{i}.self_attn.o_proj": {"bits": 16} for i in range(2)}
    from safetensors.torch import load_file

    t = load_file(sym / "model.safetensors")
    assert not any(k.endswith(".g_idx") for k in t)
    assert {w & 0xFFFFFFFF for w in t["model.layers.0.mlp.up_proj.qzeros"].flatten().tolist()} == {0x77777777}  # 8 - 1
    qws, rest = read_quantized(sym)
    assert len(qws) == 12 and all(q.zero_point is None for q in qws.values()) and "model.layers.0.self_attn.o_proj.weight" in rest

    asym = quantize(tiny["llama32"], tmp_path / "asym", "-b", "4", "-g", "32", "--asym", "-f", "auto-round")
    awq = quantize(tiny["llama32"], tmp_path / "awq", "-b", "4", "-g", "32", "--asym", "-f", "awq")
    assert json.loads((asym / "config.json").read_text())["quantization_config"]["packing_format"] == "auto_round:auto_awq"
    a, b = load_file(asym / "model.safetensors"), load_file(awq / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    p = _run_cli("inspect", asym, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["format"] == "auto-round" and r["totals"]["bpw_quantized"] == 4.625


@pytest.mark.parametrize(
    "model, args, words",
    [
        ("llama", ["-b", "4", "-g", "32"], ["k_proj", "48x96", "multiples of 32"]),  # kv heads 2 x 24
        ("llama32", ["-b", "3", "-g", "32", "--asym"], ["auto_awq", "4-bit", "int3"]),
        ("llama32", ["-b", "4", "-g", "256", "--asym"], ["256", "16, 32, 64, 128"]),
        ("llama32", ["--qtype", "fp8"], ["auto-round", "fp8"]),
    ],
    ids=["sym-width-48", "asym-int3", "asym-group-256", "fp8"],
)
def test_refusals(tiny, tmp_path, model, args, words):
    p = _run_cli("quantize", tiny[model], "-m", "rtn", *args, "-f", "auto-round", "-o", tmp_path / "q")
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and all(w in p.stderr for w in words), p.stderr
    assert not (tmp_path / "q").exists()


# -- the consumer: stock transformers + auto-round (+ gptqmodel) ------------------------------------
CASES = {
    # id: (args, kernel class auto-round picks on CPU)
    "sym-int4-g32": (["-b", "4", "-g", "32"], "QuantLinear"),  # auto_round:torch_zp
    "sym-int3-g32": (["-b", "3", "-g", "32"], "QuantLinear"),
    "sym-int2-g32-ignore": (["-b", "2", "-g", "32", "--ignore", "*o_proj"], "QuantLinear"),
    "sym-int8-channel": (["-b", "8"], "QuantLinear"),
    "asym-int4-g32": (["-b", "4", "-g", "32", "--asym"], "AwqTorchLinear"),  # gptqmodel:awq_torch
    "repacked-from-gptq": (["-b", "4", "-g", "32"], "QuantLinear"),  # -f gptq, then `qtool export -f auto-round`
}


def _has_auto_round() -> bool:
    return GPTQ_PY.exists() and subprocess.run([str(GPTQ_PY), "-c", "import auto_round"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def consumed(tiny, tmp_path_factory):
    if not _has_auto_round():
        pytest.skip(f"auto-round missing in {GPTQ_PY}: `make autoround-venv` installs it there")
    root = tmp_path_factory.mktemp("ar_out")
    outs = {}
    for case, (args, _) in CASES.items():
        if case == "repacked-from-gptq":
            gptq = quantize(tiny["llama32"], root / "gptq", *args, "-f", "gptq")
            p = _run_cli("export", gptq, "-f", "auto-round", "-o", root / case)
            assert p.returncode == 0, p.stderr
            outs[case] = root / case
        else:
            outs[case] = quantize(tiny["llama32"], root / case, *args, "-f", "auto-round")
    return consume(outs, root / "consumer.pt")


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_autoround_loads_our_output(consumed, tiny, case):
    out, got = consumed[case]
    assert got["kernels"] == [CASES[case][1]]
    qws, _ = read_quantized(out)
    assert set(got["weights"]) == set(qws)  # ignored layers stay plain Linear (extra_config bits 16)
    # 1. each kernel's weight is our dequantization (fp16 scales as stored), to one rounding in the
    #    dtype the model runs in (auto-round forces float16 for the AWQ packing, bf16 otherwise)
    state = read_dequantized(out)
    dtype = getattr(torch, got["dtype"].removeprefix("torch."))
    for name, w in got["weights"].items():
        ref = state[name + ".weight"]
        torch.testing.assert_close(w, ref.to(dtype).float(), rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    # 2. logits equal the original model carrying our dequantized weights in that dtype (summation
    #    order differs: ~0.04 on logits ~3 in bf16, against ~0.9 from quantization itself)
    want = _reference_logits(tiny["llama32"], state, got["ids"], dtype)
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0.1)
