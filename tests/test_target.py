"""`--tensor-type` and `--target-bpw` / `--target-size`, proven by the programs that load the output:

* GGUF `--tensor-type`: the same per-tensor types, and the same bytes, as llama-quantize given the
  same flags on our BF16 file (its first-match regex search, the counters its rules skip);
* GGUF targets: the file loads in llama.cpp and computes with the weights qtool's reader decodes;
  the budget is met, refused below the minimum (named), and an importance matrix moves the choice;
* compressed-tensors with per-layer widths: transformers + compressed-tensors loads several config
  groups and predicts the logits of our dequantized weights;
* GPTQ with per-layer widths (`dynamic`): GPTQModel.load builds each layer at its width and computes
  with our weights; transformers' from_pretrained refuses the checkpoint (it ignores `dynamic`),
  which the card and notes say.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import CACHE, ROOT, invoke_cli

lct = pytest.importorskip("llama_cpp_tools")
GPTQ_PY = CACHE / "gptq-venv" / "bin" / "python"
PROMPT = [1, 5, 9, 33, 77, 2, 100, 14, 200, 255, 3, 64]


def quantize(*args, ok: bool = True):
    r = invoke_cli("quantize", *args, "--json", "-q")
    if ok:
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)
    return r


def types_of(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tools():
    t = lct._tools_at(lct.key_dir(CACHE))
    if not t.quantize.is_file():
        pytest.skip(f"llama-quantize not built under {lct.key_dir(CACHE)} (make llama-cpp)")
    return t


@pytest.fixture(scope="module")
def binding():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama_cpp binding not installed (make llama-cpp)")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Untied, 8 layers, rows of 256 / 512 (every K type applies): the model of the mixture tests."""
    from test_gguf_llama_cpp import build_wide_llama

    folder = tmp_path_factory.mktemp("wide")
    hf = build_wide_llama(folder / "hf")
    from qtool.formats.gguf.writer import GGUFWriter
    from qtool.model.resolve import open_source
    from qtool.pipeline import run

    with open_source(str(hf)) as src:
        run(str(hf), src, folder / "bf16.gguf", GGUFWriter(type="BF16"), None)
    return hf, folder / "bf16.gguf"


OVERRIDES = {
    # attn_v everywhere, the first two ffn_down by regex
    "Q4_K_M-attn_v-ffn_down": ("Q4_K_M", ["attn_v=q8_0", r"blk\.[01]\.ffn_down=q5_k"]),
    # blk.0's attn_v overridden: the Q4_K_M rule's running counter skips it, so later layers shift
    "Q4_K_M-counter": ("Q4_K_M", [r"blk\.0\.attn_v=q4_0"]),
    # a search, not a match: "output" also hits every attn_output; the first pattern wins
    "Q3_K_M-search-order": ("Q3_K_M", ["output=q8_0", "attn=q2_k"]),
    "Q5_K_S-upper-case-type": ("Q5_K_S", ["ffn_UP=Q4_1"]),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_tensor_type_equals_llama_quantize(case, tools, wide, tmp_path):
    mixture, flags = OVERRIDES[case]
    hf, bf16 = wide
    extra = [a for f in flags for a in ("--tensor-type", f)]
    theirs = types_of(tools.quantize_gguf(bf16, tmp_path / "theirs.gguf", mixture, *extra))
    quantize(hf, "-f", "gguf", "-t", mixture, *extra, "-o", tmp_path / "ours.gguf")
    ours = types_of(tmp_path / "ours.gguf")
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    differ = [n for n in ours if ours[n][1] != theirs[n][1]]
    assert differ == [], f"{len(differ)} of {len(ours)} tensors differ in bytes, e.g. {differ[:3]}"
    plain = types_of(tools.quantize_gguf(bf16, tmp_path / "plain.gguf", mixture))
    assert any(plain[n][0] != ours[n][0] for n in ours)  # the flags changed something


def test_tensor_type_refusals(wide, tmp_path):
    hf, _ = wide
    r = quantize(hf, "-f", "gguf", "-t", "Q4_K_M", "--tensor-type", "attn_v", "-o", tmp_path / "a.gguf", ok=False)
    assert r.exit_code == 2 and "PATTERN=TYPE" in r.output
    r = quantize(hf, "-f", "gguf", "-t", "Q4_K_M", "--tensor-type", "attn_v=iq2_xxs", "-o", tmp_path / "b.gguf", ok=False)
    assert r.exit_code == 3 and "IQ2_XXS" in r.output
    r = quantize(hf, "-b", "4", "--tensor-type", "attn_v=q8_0", "-o", tmp_path / "c", ok=False)
    assert r.exit_code == 2 and "--tensor-type" in r.output


# -- GGUF targets ----------------------------------------------------------------------------------
def test_gguf_target_bpw_meets_the_budget_and_loads_in_llama_cpp(binding, wide, tmp_path):
    from qtool.model.gguf_source import GGUFSource
    from test_gguf_llama_cpp import hf_logits

    hf, _ = wide
    out = tmp_path / "t.gguf"
    rep = quantize(hf, "-f", "gguf", "--target-bpw", "4.8", "-o", out)
    assert 4.6 <= rep["bpw_quantized"] <= 4.8  # within one tensor's step below the target
    kinds = {layer["strategy"] for layer in rep["layers"]}
    assert len(kinds) > 1, kinds  # a mix
    assert any("--target-bpw 4.8" in n and "optimal" in n for n in rep["notes"]), rep["notes"]
    assert gguf.GGUFReader(out).fields["general.file_type"] is not None
    got = lct.gguf_next_token_logits(out, PROMPT)
    with GGUFSource(out) as src:
        state = {m.name: src.get_tensor(m.name).float() for m in src.tensors()}
    want = hf_logits(hf, PROMPT, state)
    # llama.cpp quantizes activations to 8 bits in its K/Q8 dot products: measured max |diff| 0.05
    # on logits of magnitude ~1.5 here, against 0.3 between these weights and the original ones
    assert np.abs(got - want).max() < 0.15
    assert np.abs(got - hf_logits(hf, PROMPT)).max() > np.abs(got - want).max()


def test_gguf_target_size_and_minimum(wide, tmp_path):
    hf, _ = wide
    out = tmp_path / "s.gguf"
    rep = quantize(hf, "-f", "gguf", "--target-size", "2.5MB", "-o", out)
    assert 2_450_000 <= out.stat().st_size <= 2_500_000  # within one tensor's step below
    assert any("bytes reached" in n for n in rep["notes"])
    low = quantize(hf, "-f", "gguf", "--target-bpw", "1.5", "-o", tmp_path / "low.gguf", ok=False)
    assert low.exit_code == 2 and "minimum 2.625 bits per weight" in low.output and "Q2_K" in low.output
    assert not (tmp_path / "low.gguf").exists()
    both = quantize(hf, "-f", "gguf", "-t", "Q4_K_M", "--target-bpw", "5", "-o", tmp_path / "x.gguf", ok=False)
    assert both.exit_code == 2 and "drop --type" in both.output


def test_gguf_target_pins_tensor_types_and_follows_importance(wide, tmp_path, wiki_sample):
    """An imatrix that makes blk.0's MLP inputs 10^4 times more important than the rest gives those
    tensors more bits than the plain choice does; a --tensor-type pin stays."""
    from qtool.formats.gguf.imatrix import read_imatrix, save_imatrix

    hf, _ = wide
    plain = tmp_path / "plain.gguf"
    quantize(hf, "-f", "gguf", "--target-bpw", "4", "--tensor-type", "output=q8_0", "-o", plain)
    imx_path = tmp_path / "fake.imatrix.gguf"
    _uniform_imatrix(hf, imx_path, boost=r"blk.0.ffn_")
    weighted = tmp_path / "weighted.gguf"
    quantize(hf, "-f", "gguf", "--target-bpw", "4", "--tensor-type", "output=q8_0", "--imatrix", imx_path, "-o", weighted)
    a, b = types_of(plain), types_of(weighted)
    assert a["output.weight"][0] == b["output.weight"][0] == "Q8_0"
    bits = lambda t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1] * 8 / gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]  # noqa: E731
    boosted = [n for n in a if n.startswith("blk.0.ffn_")]
    assert sum(bits(b[n][0]) for n in boosted) > sum(bits(a[n][0]) for n in boosted), {n: (a[n][0], b[n][0]) for n in boosted}
    del read_imatrix, save_imatrix


def _uniform_imatrix(hf: Path, path: Path, boost: str) -> None:
    """A llama.cpp imatrix for the wide model: importance 1 everywhere, 10^4 on tensors named `boost...`."""
    from qtool.formats.gguf.imatrix import ImatrixEntry, Imatrix, save_imatrix
    from qtool.formats.gguf.writer import GGUFWriter
    from qtool.model.resolve import open_source

    with open_source(str(hf)) as src:
        entries = GGUFWriter(type="Q4_K_M").plan(src)
    out = {}
    for e in entries:
        if e.name.endswith(".weight") and len(e.shape) == 2 and "norm" not in e.name and e.name != "token_embd.weight":
            w = 1e4 if e.name.startswith(boost) else 1.0
            out[e.name] = ImatrixEntry(np.full((1, e.ne[0]), w, dtype=np.float32), np.ones(1, dtype=np.float32))
    save_imatrix(path, Imatrix(path, out, ["synthetic"], 1, 1))


# -- compressed-tensors and GPTQ with per-layer widths ---------------------------------------------
def test_compressed_tensors_mixed_widths_load_in_transformers(tiny_byte_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from qtool.formats.compressed_tensors import read_dequantized

    out = tmp_path / "ct"
    rep = quantize(tiny_byte_llama, "-b", "4", "-g", "32", "--target-bpw", "5.5", "-o", out)
    assert rep["bpw_quantized"] <= 5.5
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len({g["weights"]["num_bits"] for g in groups.values()}) >= 2, groups
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    missing = ref.load_state_dict(read_dequantized(out), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys
    ids = torch.tensor([PROMPT[:10]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # the same fp32 weights: summation order only


def test_gptq_mixed_widths_load_in_gptqmodel(tiny_byte_llama, tmp_path):
    if not GPTQ_PY.exists():
        pytest.skip(f"{GPTQ_PY} missing: `make gptq-venv` installs transformers + optimum + gptqmodel there")
    from transformers import AutoModelForCausalLM

    from qtool.formats.gptq import read_dequantized, read_quantized

    out = tmp_path / "g"
    rep = quantize(tiny_byte_llama, "-b", "4", "-g", "32", "-f", "gptq", "--target-bpw", "5.5", "-o", out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["dynamic"] and any("GPTQModel `dynamic`" in n for n in rep["notes"])
    assert "GPTQModel.load" in (out / "README.md").read_text()
    qws, _ = read_quantized(out)
    widths = {m: q.qtype.bits for m, q in qws.items()}
    assert set(widths.values()) == {4, 8}
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    result = tmp_path / "consumer.pt"
    p = subprocess.run([str(GPTQ_PY), str(ROOT / "tests" / "gptq_consumer.py"), str(result), "--gptqmodel", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(result)[str(out)]
    state = read_dequantized(out)
    assert set(got["weights"]) == set(qws)
    for name, w in got["weights"].items():  # each layer built at its own width computes with our weights
        ref = state[name + ".weight"]
        torch.testing.assert_close(w, ref.to(torch.bfloat16).float(), rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    ref_model.load_state_dict(state, strict=False)
    with torch.no_grad():
        want = ref_model.to(torch.bfloat16)(got["ids"]).logits[0].float()
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0.1)  # bf16 both sides, as tests/test_gptq_format.py
    # transformers' own route ignores `dynamic`: it refuses (size mismatch), never loads wrong widths silently
    p = subprocess.run([str(GPTQ_PY), str(ROOT / "tests" / "gptq_consumer.py"), str(tmp_path / "tf.pt"), str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "mismatch" in (p.stdout + p.stderr).lower()


def test_targets_refused_where_a_format_holds_one_width(tiny_byte_llama, tmp_path):
    r = quantize(tiny_byte_llama, "-b", "4", "-g", "32", "-f", "awq", "--target-bpw", "5", "-o", tmp_path / "a", ok=False)
    assert r.exit_code == 3 and "one bit-width per model" in r.output
    r = quantize(tiny_byte_llama, "-b", "4", "--target-bpw", "5", "--target-size", "1MB", "-o", tmp_path / "b", ok=False)
    assert r.exit_code == 2


def test_dry_run_plans_a_target_without_reading_weights(wide, tmp_path, monkeypatch):
    from qtool.model.safetensors_source import SafetensorsSource

    hf, _ = wide
    monkeypatch.setattr(SafetensorsSource, "get_tensor", lambda self, name: pytest.fail(f"read {name}"))
    r = invoke_cli("quantize", hf, "-f", "gguf", "--target-bpw", "4.8", "-o", tmp_path / "d.gguf", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["runs"][0]["bpw_quantized"] <= 4.8 and len({x["type"] for x in plan["runs"][0]["layers"]}) > 1
