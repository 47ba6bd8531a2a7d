"""`-f awq`: AutoAWQ's GEMM layout, proven by its consumer (stock transformers + gptqmodel, in the
isolated `.cache/gptq-venv`), plus the readers that come with it: `inspect`, `export` (dequantize,
and lossless repacks between GPTQ, AWQ, compressed-tensors and auto-round) and `eval`.

Layout and reader tests run in the project venv; the consumer test is skipped, saying so, where the
GPTQ venv is missing (`make gptq-venv`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool.core.affine import quantize_int
from qtool.core.packing import AWQ_ORDER, pack_awq_order, pack_bits, unpack_awq_order
from qtool.core.qweight import QuantizedWeight
from qtool.formats.awq import pack_awq, unpack_awq
from qtool.model.quantized_source import read_dequantized, read_quantized
from qtool.qtypes import get_qtype
from test_gptq_format import GPTQ_PY, ROOT
from tiny_models import build_tiny, build_tiny_with_byte_tokenizer, make_config, save_random


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_src")
    models = {arch: build_tiny(arch, root / arch) for arch in ("llama", "qwen2")}
    models["llama-bytes"] = build_tiny_with_byte_tokenizer(root / "llama-bytes")
    cfg = make_config("llama")
    cfg.intermediate_size = 164  # gate/up: 164 outputs, not a multiple of 8
    models["llama-164"] = save_random(cfg, root / "llama-164", 1)
    return models


def _run_cli(*args: object) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, run from tests/: from the repository root, `python -m` would put
    its `kernels/` folder ahead of Hugging Face's `kernels` package, which transformers probes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT / "tests")


def quantize(src: Path, out: Path, *args: object) -> Path:
    method = [] if "-m" in args else ["-m", "rtn"]
    p = _run_cli("quantize", src, *method, *args, "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    return out


# -- the layout, in the project venv ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["g16", "g32", "g128", "channel"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_pack_unpack_round_trip(layout, sym):
    torch.manual_seed(len(layout) + sym)
    w = torch.randn(40, 256).to(torch.bfloat16)  # 40 outputs: 5 words of 8
    strategy, g = ("channel", None) if layout == "channel" else ("group", int(layout[1:]))
    qw = quantize_int(w, get_qtype("int4"), strategy=strategy, group_size=g, symmetric=sym)
    t = pack_awq(qw)
    G = qw.n_groups
    assert t["qweight"].shape == (256, 5) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (G, 5) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (G, 40) and t["scales"].dtype == torch.float16
    back = unpack_awq(t, 4, g or -1)
    assert torch.equal(back.codes, qw.codes)
    assert (back.zero_point is None) == (sym or not qw.zero_point.any())
    if not sym:
        assert torch.equal(back.zero_point, qw.zero_point)
    # bf16 scales of these weights are fp16-exact: the dequantization is bit-identical
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=0, atol=0)


def test_nibble_order_by_hand():
    """Columns 0..7 holding unsigned codes 0..7: nibble j of the word holds column AWQ_ORDER[j],
    so the word reads 0x75316420; zero points are stored raw (symmetric: 8 -> 0x88888888)."""
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    codes = torch.arange(8, dtype=torch.int8).reshape(8, 1).repeat(1, 16) - 8  # [out 8, in 16], column o = o - 8
    qw = QuantizedWeight(get_qtype("int4"), codes, torch.ones(8, 1, dtype=torch.bfloat16), None, "group", 16)
    t = pack_awq(qw)
    assert [w & 0xFFFFFFFF for w in t["qweight"][:, 0].tolist()] == [0x75316420] * 16
    assert [w & 0xFFFFFFFF for w in t["qzeros"][:, 0].tolist()] == [0x88888888]
    # the sequential order (what the negative control below writes) is a different word
    assert pack_bits(torch.arange(8).reshape(1, 8), 4, dim=1).item() == 0x76543210
    u = torch.randint(0, 16, (3, 64), dtype=torch.int32)
    assert torch.equal(unpack_awq_order(pack_awq_order(u), 64), u)


# -- refusals, before anything is written ----------------------------------------------------------
@pytest.mark.parametrize(
    "model, args, words",
    [
        ("llama", ["-b", "4", "-g", "256", "--asym"], ["256", "at most 128"]),
        ("llama", ["-b", "4", "-g", "48"], ["48", "16, 32, 64, 128"]),
        ("llama", ["-b", "3", "-g", "32"], ["awq", "4-bit", "int3"]),
        ("llama", ["-b", "8", "--asym"], ["awq", "4-bit", "int8"]),
        ("llama", ["--qtype", "fp8"], ["awq", "fp8"]),
        ("llama-164", ["-b", "4", "--asym"], ["gate_proj", "164", "multiple of 8"]),
    ],
    ids=["group-256", "group-48", "int3", "int8", "fp8", "out-not-multiple-of-8"],
)
def test_refusals(tiny, tmp_path, model, args, words):
    p = _run_cli("quantize", tiny[model], "-m", "rtn", *args, "-f", "awq", "-o", tmp_path / "q")
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and all(w in p.stderr for w in words), p.stderr
    assert not (tmp_path / "q").exists()


def test_config_and_group_adaptation(tiny, tmp_path):
    """-g 64 on widths 96/160 (not multiples of 64): one smaller group size, said in the summary;
    an ignored layer is listed in modules_to_not_convert (transformers converts every other Linear)."""
    p = _run_cli("quantize", tiny["llama"], "-m", "rtn", "-b", "4", "-g", "64", "--asym", "--ignore", "*down_proj",
                 "-f", "awq", "-o", tmp_path / "q", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert any("group size 32 instead of 64" in n for n in report["notes"]), report["notes"]
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    skipped = sorted(qcfg.pop("modules_to_not_convert"))
    assert qcfg == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}
    assert skipped == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    qws, rest = read_quantized(tmp_path / "q")
    assert len(qws) == 12 and "model.layers.0.mlp.down_proj.weight" in rest


# -- inspect, export, eval: the readers ------------------------------------------------------------
def test_inspect_counts_awq(tiny, tmp_path):
    out = quantize(tiny["llama"], tmp_path / "q", "-b", "4", "-g", "32", "--asym", "-f", "awq")
    p = _run_cli("inspect", out, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["format"] == "awq"
    plain = json.loads(_run_cli("inspect", tiny["llama"], "--json").stdout)
    assert r["totals"]["params"] == plain["totals"]["params"]  # logical shapes decoded from the packed ones
    # 4-bit codes + 4-bit zero point and fp16 scale per 32 weights: 4 + 20/32 bits, exact
    assert r["totals"]["bpw_quantized"] == 4.625
    types = {t["type"] for t in r["tensors"] if t["quantized"]}
    assert types == {"int4 g32"}


def test_export_dequantizes_with_the_reference_math(tiny, tmp_path):
    out = quantize(tiny["llama"], tmp_path / "q", "-b", "4", "-g", "32", "--asym", "-f", "awq")
    p = _run_cli("export", out, "-f", "safetensors", "-o", tmp_path / "plain")
    assert p.returncode == 0, p.stderr
    from safetensors.torch import load_file

    got = load_file(tmp_path / "plain" / "model.safetensors")
    want = read_dequantized(out, torch.float32)
    assert set(got) == set(want)
    for k, t in want.items():
        assert torch.equal(got[k], t.to(got[k].dtype)), k  # bf16, the model's dtype: one rounding of the same values
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def _codes(folder: Path) -> dict:
    qws, _ = read_quantized(folder)
    return {m: (q.codes, q.zero_point, q.scale.to(torch.float32), q.group_size) for m, q in qws.items()}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for m in a:
        ca, za, sa, ga = a[m]
        cb, zb, sb, gb = b[m]
        assert torch.equal(ca, cb) and torch.equal(sa, sb) and ga == gb, m
        assert (za is None and zb is None) or torch.equal(za if za is not None else torch.zeros_like(zb), zb if zb is not None else torch.zeros_like(za)), m


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_lossless_repack_round_trip(tiny, tmp_path, sym):
    """awq -> gptq -> compressed-tensors -> auto-round -> awq keeps every code, zero point and scale;
    the last AWQ file is byte-identical to the first where the scheme allows (same tensors)."""
    flags = ["-b", "4", "-g", "32"] + ([] if sym else ["--asym"])
    src = tiny["llama"] if not sym else tiny["llama-bytes"]  # sym auto-round needs widths % 32: ignore k/v there
    extra = ["--ignore", "*k_proj", "--ignore", "*v_proj"] if sym else []
    first = quantize(src, tmp_path / "awq0", *flags, *extra, "-f", "awq")
    want = _codes(first)
    prev = first
    for i, fmt in enumerate(["gptq", "compressed-tensors", "auto-round", "awq"]):
        out = tmp_path / f"{i}-{fmt}"
        p = _run_cli("export", prev, "-f", fmt, "-o", out)
        assert p.returncode == 0, p.stderr
        assert "codes kept exactly" in p.stdout
        _same(want, _codes(out))
        prev = out
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(prev / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_repack_refusals(tiny, tmp_path):
    # GPTQ holds a partial last group (96 = 64 + 32); AWQ and compressed-tensors cannot
    gptq = quantize(tiny["llama"], tmp_path / "gptq64", "-b", "4", "-g", "64", "-f", "gptq")
    for fmt in ("awq", "compressed-tensors"):
        p = _run_cli("export", gptq, "-f", fmt, "-o", tmp_path / fmt)
        assert p.returncode == 3, p.stderr
        assert "cannot be kept" in p.stderr and "partial group" in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / fmt).exists()
    # 3-bit codes: AWQ holds 4-bit only
    gptq3 = quantize(tiny["llama"], tmp_path / "gptq3", "-b", "3", "-g", "32", "--ignore", "*k_proj", "--ignore", "*v_proj", "-f", "gptq")
    p = _run_cli("export", gptq3, "-f", "awq", "-o", tmp_path / "awq3")
    assert p.returncode == 3 and "4-bit" in p.stderr, p.stderr
    # an act-order group map: only GPTQ stores it
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    act = quantize(tiny["llama-bytes"], tmp_path / "act", "-m", "gptq", "-b", "4", "-g", "32", "--act-order",
                   "--dataset", text, "--samples", "4", "--seq-len", "32", "-f", "gptq")
    p = _run_cli("export", act, "-f", "awq", "-o", tmp_path / "act-awq")
    assert p.returncode == 3 and "g_idx" in p.stderr, p.stderr
    # an unquantized model has no codes to keep
    p = _run_cli("export", tiny["llama"], "-f", "awq", "-o", tmp_path / "plain-awq")
    assert p.returncode == 3 and "not quantized" in p.stderr, p.stderr


def test_eval_reads_awq_folders(tiny, tmp_path):
    """Without gptqmodel (the project venv) `qtool eval` dequantizes an AWQ folder with the reader;
    the same codes repacked as GPTQ score identically, and differ from the base."""
    base = tiny["llama-bytes"]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"word{i % 37} of the river and city {i % 11}." for i in range(200)) + "\n")
    awq = quantize(base, tmp_path / "awq", "-b", "4", "-g", "32", "--asym", "-f", "awq")
    assert _run_cli("export", awq, "-f", "gptq", "-o", tmp_path / "gptq").returncode == 0
    reports = []
    for model in (awq, tmp_path / "gptq"):
        p = _run_cli("eval", model, "--base", base, "--dataset", text, "--seq-len", 32, "--windows", 2, "--json")
        assert p.returncode == 0, p.stderr
        reports.append(json.loads(p.stdout))
    assert reports[0]["perplexity"] == reports[1]["perplexity"]
    assert reports[0]["kld_mean"] > 0


# -- the consumer: stock transformers + gptqmodel ----------------------------------------------------
CASES = {
    "int4-g32-asym": ("llama", ["-b", "4", "-g", "32", "--asym"]),
    "int4-g64-sym-adapted": ("llama", ["-b", "4", "-g", "64"]),  # 96/160 wide: g32, zero points 8
    "int4-channel-asym": ("llama", ["-b", "4", "--asym"]),
    "int4-g16-asym-bias-ignore": ("qwen2", ["-b", "4", "-g", "16", "--asym", "--ignore", "*o_proj"]),
    "gptq-int4-g32-asym": ("llama-bytes", ["-m", "gptq", "-b", "4", "-g", "32", "--asym", "--dataset", "{text}",
                                           "--samples", "4", "--seq-len", "32"]),
}


def _sequential_copy(src: Path, dst: Path) -> Path:
    """The negative control: the same codes packed in plain sequential nibble order."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith((".qweight", ".qzeros"))]:
        t = tensors[name]
        tensors[name] = pack_bits(unpack_awq_order(t, t.shape[1] * 8), 4, dim=1)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def consumed(tiny, tmp_path_factory):
    if not GPTQ_PY.exists():
        pytest.skip(f"{GPTQ_PY} missing: `make gptq-venv` installs transformers + optimum + gptqmodel there")
    root = tmp_path_factory.mktemp("awq_out")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    outs = {}
    for case, (arch, args) in CASES.items():
        outs[case] = quantize(tiny[arch], root / case, *[str(a).replace("{text}", str(text)) for a in args], "-f", "awq")
    outs["sequential-order"] = _sequential_copy(outs["int4-g32-asym"], root / "sequential-order")
    return consume(outs, root / "consumer.pt")


def consume(outs: dict[str, Path], result: Path) -> dict[str, tuple[Path, dict]]:
    """Load every folder in one GPTQ-venv process (tests/gptq_consumer.py): {case: (folder, what it computed)}."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([str(GPTQ_PY), str(ROOT / "tests" / "gptq_consumer.py"), str(result), *map(str, outs.values())],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(result)
    return {case: (out, got[str(out)]) for case, out in outs.items()}


def _reference_logits(arch_dir: Path, state: dict, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The original model carrying `state` (our dequantized weights), run in `dtype`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    with torch.no_grad():
        return model.to(dtype)(ids).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_gptqmodel_loads_our_awq(consumed, tiny, case):
    arch, args = CASES[case]
    out, got = consumed[case]
    assert got["kernels"] and all("awq" in k.lower() for k in got["kernels"]), got["kernels"]
    qws, _ = read_quantized(out)
    assert set(got["weights"]) == set(qws)  # every quantized module, and only those, is an AWQ module
    # 1. each kernel's weight is our dequantization ((q - z) * s, fp16 scales as stored), to one
    #    bf16 rounding (the kernel computes in the activation dtype)
    state = read_dequantized(out)
    for name, w in got["weights"].items():
        ref = state[name + ".weight"]
        torch.testing.assert_close(w, ref.to(torch.bfloat16).float(), rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    # 2. logits equal the original model carrying our dequantized weights, both in bf16
    #    (summation order differs: a few 0.01 on logits ~3, against ~0.9 from quantization itself)
    want = _reference_logits(tiny[arch], state, got["ids"])
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0.1)


def test_sequential_nibble_order_fails(consumed, tiny):
    """Negative control: the same codes in sequential nibble order load without complaint and give
    visibly wrong weights and logits, so the comparison above can fail."""
    out, got = consumed["sequential-order"]
    state = read_dequantized(consumed["int4-g32-asym"][0])  # what the codes mean
    want = _reference_logits(tiny["llama"], state, got["ids"])
    assert (got["logits"] - want).abs().max() > 1.0  # 10x the tolerance of the test above
    name = next(iter(got["weights"]))
    assert (got["weights"][name] - state[name + ".weight"]).abs().max() > 0.1 * state[name + ".weight"].abs().max()
