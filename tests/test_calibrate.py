"""`qtool calibrate` and `qtool quantize --stats`: the statistics file, its reuse, and bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import invoke_cli

SAMPLES, SEQ = 4, 32


@pytest.fixture(scope="module")
def stats_file(tiny_byte_llama, wiki_sample, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stats") / "tiny.stats.safetensors"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def _float_inputs(model_dir: Path, wiki_sample: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every Linear's inputs in the float model run by transformers, concatenated over samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.calib.data import load_calibration

    ids = load_calibration(str(wiki_sample), AutoTokenizer.from_pretrained(model_dir), samples=SAMPLES, seq_len=SEQ).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return ids, {n: torch.cat(v) for n, v in xs.items()}


def test_stats_match_the_float_model(stats_file, tiny_byte_llama, wiki_sample):
    """Block by block on the unquantized model: every saved statistic equals what transformers'
    own forward feeds each Linear (float32 both sides: summation-order noise only)."""
    path, report = stats_file
    _, xs = _float_inputs(tiny_byte_llama, wiki_sample)
    meta = safe_open(str(path), "pt").metadata()
    modules = json.loads(meta["modules"])
    assert set(modules) == set(xs), "one entry per decoder-block Linear"
    assert report["modules"] == len(xs) and report["tokens"] == SAMPLES * SEQ
    # q/k/v and gate/up read the same input tensor: stored once, under the first
    assert modules["model.layers.0.self_attn.k_proj"]["owner"] == "model.layers.0.self_attn.q_proj"
    assert modules["model.layers.1.mlp.up_proj"]["owner"] == "model.layers.1.mlp.gate_proj"
    assert modules["model.layers.1.mlp.down_proj"]["owner"] == "model.layers.1.mlp.down_proj"
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    with safe_open(str(path), "pt") as f:
        for m, e in modules.items():
            X, o = xs[m], e["owner"]
            assert int(f.get_tensor(f"{o}.tokens")[0]) == X.shape[0]
            assert rel(f.get_tensor(f"{o}.xtx"), X.T @ X) < 1e-5, m
            assert rel(f.get_tensor(f"{o}.sum_x2"), (X * X).sum(0)) < 1e-5, m
            assert rel(f.get_tensor(f"{o}.sum_abs"), X.abs().sum(0)) < 1e-5, m
            assert rel(f.get_tensor(f"{o}.max_abs"), X.abs().amax(0)) < 1e-5, m
    assert json.loads(meta["calibration"])["samples"] == SAMPLES


def test_quantize_reuses_the_stats(stats_file, tiny_byte_llama, tmp_path, monkeypatch):
    """--stats: no calibration data is read, and each layer is exactly GPTQ on the saved Hessian."""
    import qtool.pipeline
    from qtool.calib.stats import CalibStats
    from qtool.methods.gptq import gptq_quantize
    from qtool.qtypes import get_qtype

    def no_data(*a, **k):
        raise AssertionError("--stats must not read calibration data")

    monkeypatch.setattr(qtool.pipeline, "load_calibration_for", no_data)
    path, _ = stats_file
    out = tmp_path / "q"
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "-b", "4", "-g", "16", "--stats", path, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["calibration"]["stats_file"] == str(path) and rep["calibration"]["sequential"] is False
    assert any("not sequential" in n for n in rep["notes"])
    shares = {x["name"]: x["gptq"]["shares_hessian_with"] for x in rep["layers"]}
    assert shares["model.layers.0.self_attn.v_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"

    from qtool.formats.compressed_tensors import read_dequantized

    got = read_dequantized(out)
    stats = CalibStats(path)
    with safe_open(str(tiny_byte_llama / "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            w = f.get_tensor(name)
            qw, _ = gptq_quantize(w, stats.hessian(name.removesuffix(".weight")), get_qtype("int4"), group_size=16, symmetric=True)
            assert torch.equal(got[name].float(), qw.dequantize(torch.float32)), name


def test_stats_block0_equals_a_calibration_run(stats_file, tiny_byte_llama, wiki_sample, tmp_path):
    """Block 0's first linears (q/k/v: the block's input) see the same activations whether the model
    is quantized or not, so GPTQ from the stats file and GPTQ from a calibration run on the same
    windows give them identical weights; every later linear differs, because only the calibration
    run feeds it the outputs of already-quantized layers (true-sequential inside the block too)."""
    from qtool.formats.compressed_tensors import read_dequantized

    path, _ = stats_file
    common = ("-m", "gptq", "-b", "4", "-g", "16")
    a, b = tmp_path / "from-stats", tmp_path / "from-data"
    assert invoke_cli("quantize", tiny_byte_llama, *common, "--stats", path, "-o", a).exit_code == 0
    r = invoke_cli("quantize", tiny_byte_llama, *common, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", b)
    assert r.exit_code == 0, r.output
    wa, wb = read_dequantized(a), read_dequantized(b)
    first = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    for n in wa:
        if n.endswith("proj.weight"):
            assert torch.equal(wa[n], wb[n]) == (n in first), n


def test_no_hessian_file_is_small_and_refused_by_gptq(tiny_byte_llama, wiki_sample, tmp_path, stats_file):
    out = tmp_path / "vec.safetensors"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", out, "--no-hessian")
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        assert not any(k.endswith(".xtx") for k in f.keys()) and any(k.endswith(".sum_x2") for k in f.keys())
    assert out.stat().st_size < stats_file[0].stat().st_size / 4
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "-b", "4", "--stats", out, "-o", tmp_path / "q")
    assert r.exit_code == 2 and "Hessians" in r.output and not (tmp_path / "q").exists()


# -- bad input ---------------------------------------------------------------------------------------
def _assert_clean_failure(r, code: int, *words: str, absent: Path) -> None:
    assert r.exit_code == code, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for w in words:
        assert w in line, (w, line)
    assert not absent.exists()
    assert not [p for p in absent.parent.iterdir() if "qtool-partial" in p.name]


def test_stats_for_another_model(stats_file, tmp_path):
    from tiny_models import build_tiny_with_byte_tokenizer

    other = build_tiny_with_byte_tokenizer(tmp_path / "other", hidden_size=64)
    r = invoke_cli("quantize", other, "-m", "gptq", "-b", "4", "--stats", stats_file[0], "-o", tmp_path / "q")
    _assert_clean_failure(r, 2, "another model", "hidden_size", "qtool calibrate", absent=tmp_path / "q")


def test_stats_missing_a_layer(stats_file, tiny_byte_llama, tmp_path):
    src = stats_file[0]
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = json.loads(meta["modules"])
    del modules["model.layers.1.mlp.down_proj"]
    bad = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}, str(bad), {**meta, "modules": json.dumps(modules)})
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "-b", "4", "--stats", bad, "-o", tmp_path / "q")
    _assert_clean_failure(r, 2, "model.layers.1.mlp.down_proj", "no statistics", absent=tmp_path / "q")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-stats", "nan", "missing-tensor"])
def test_corrupted_stats(stats_file, tiny_byte_llama, tmp_path, damage):
    src = stats_file[0]
    bad = tmp_path / f"{damage}.safetensors"
    data = src.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(struct.pack("<Q", 10**12) + b"junk")
    elif damage == "not-stats":
        save_file({"x": torch.zeros(2)}, str(bad))
    else:
        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        if damage == "nan":
            tensors["model.layers.0.self_attn.q_proj.xtx"][0, 0] = float("nan")
        else:
            del tensors["model.layers.0.mlp.gate_proj.sum_abs"]
        save_file(tensors, str(bad), meta)
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "-b", "4", "--stats", bad, "-o", tmp_path / "q")
    _assert_clean_failure(r, 5, str(bad), absent=tmp_path / "q")


def test_flag_conflicts(stats_file, tiny_byte_llama, wiki_sample, tmp_path):
    q = tmp_path / "q"
    _assert_clean_failure(invoke_cli("quantize", tiny_byte_llama, "-m", "rtn", "--stats", stats_file[0], "-o", q), 2, "--stats", absent=q)
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "--stats", stats_file[0], "--dataset", wiki_sample, "-o", q)
    _assert_clean_failure(r, 2, "--stats", "--dataset", absent=q)
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "--stats", tmp_path / "nope.safetensors", "-o", q)
    _assert_clean_failure(r, 2, "nope.safetensors", "qtool calibrate", absent=q)


def test_calibrate_bad_input(tiny_byte_llama, wiki_sample, tmp_path, stats_file):
    out = tmp_path / "s.safetensors"
    r = invoke_cli("calibrate", tiny_byte_llama, "-o", out)
    _assert_clean_failure(r, 2, "--dataset", absent=out)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here. " * 4)
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", short, "--samples", 8, "--seq-len", 64, "-o", out)
    _assert_clean_failure(r, 5, "tokens", "too few", absent=out)
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", tmp_path / "missing.jsonl", "-o", out)
    _assert_clean_failure(r, 5, "missing.jsonl", "no such file", absent=out)
    # an existing output is kept unless --overwrite
    before = stats_file[0].read_bytes()
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", stats_file[0])
    assert r.exit_code == 5 and "--overwrite" in r.output and stats_file[0].read_bytes() == before


def test_calibrate_writes_a_llama_cpp_imatrix(tiny_byte_llama, wiki_sample, tmp_path):
    """--imatrix: the same Σx² and token counts as the stats file, under GGUF tensor names, in the
    layout llama-quantize reads (tests/test_imatrix.py proves llama.cpp accepts write_imatrix's files)."""
    from qtool.calib.stats import CalibStats
    from qtool.formats.gguf.imatrix import read_imatrix

    out, imx_path = tmp_path / "s.safetensors", tmp_path / "tiny.imatrix.gguf"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", out,
             "--imatrix", imx_path, "--no-hessian", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["imatrix"] == str(imx_path)
    imx, stats = read_imatrix(imx_path), CalibStats(out)
    assert imx.chunk_count == SAMPLES and imx.chunk_size == SEQ and imx.datasets == [str(wiki_sample)]
    names = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj", "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj",
             "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj", "blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj"}
    assert len(imx.entries) == len(stats.modules)
    for g, hf in names.items():
        want = (stats.vector(hf, "sum_x2") / stats.tokens(hf)).numpy()
        assert imx.importance(g) == pytest.approx(want, rel=1e-6), g


def test_gguf_imatrix_from_a_stats_file(smollm2_dir, wiki_sample, tmp_path):
    """`-f gguf --imatrix stats.safetensors` weighs the rounding exactly as the llama.cpp imatrix that
    `calibrate --imatrix` wrote from the same run does: identical tensor bytes; and not as no imatrix."""
    import gguf
    from tiny_models import build_tiny_with_tokenizer_of

    tiny = build_tiny_with_tokenizer_of(tmp_path / "tiny", smollm2_dir)
    stats, imx = tmp_path / "s.safetensors", tmp_path / "i.gguf"
    r = invoke_cli("calibrate", tiny, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", stats,
                   "--imatrix", imx, "--no-hessian")
    assert r.exit_code == 0, r.output
    outs = {}
    for label, extra in (("stats", ["--imatrix", stats]), ("imatrix", ["--imatrix", imx]), ("none", [])):
        outs[label] = tmp_path / f"{label}.gguf"
        r = invoke_cli("quantize", tiny, "-f", "gguf", "-t", "Q4_0", *extra, "-o", outs[label])
        assert r.exit_code == 0, r.output

    def data(p):
        return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(p).tensors}

    a, b, c = data(outs["stats"]), data(outs["imatrix"]), data(outs["none"])
    assert a == b
    assert any(a[n] != c[n] for n in a if n.startswith("blk."))
    other = build_tiny_with_tokenizer_of(tmp_path / "other", smollm2_dir, hidden_size=64)
    r = invoke_cli("quantize", other, "-f", "gguf", "-t", "Q4_0", "--imatrix", stats, "-o", tmp_path / "x.gguf")
    _assert_clean_failure(r, 2, "--imatrix", "another model", absent=tmp_path / "x.gguf")


def test_inspect_describes_stats_and_imatrix_files(tiny_byte_llama, wiki_sample, tmp_path, stats_file):
    imx = tmp_path / "t.imatrix.dat"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", tmp_path / "s.safetensors",
             "--imatrix", imx, "--no-hessian")
    assert r.exit_code == 0, r.output
    s = json.loads(invoke_cli("inspect", stats_file[0], "--json").stdout)
    assert s["kind"] == "qtool calibration statistics" and s["hessians"] is True
    assert s["linears"] == stats_file[1]["modules"] and s["calibration"]["tokens"] == SAMPLES * SEQ
    i = json.loads(invoke_cli("inspect", imx, "--json").stdout)
    assert "legacy" in i["kind"] and i["entries"] == s["linears"] and i["chunks"] == SAMPLES
    # an ordinary checkpoint is still inspected as one
    assert "params" in invoke_cli("inspect", tiny_byte_llama, "--json").stdout


def test_calibrate_reads_a_gguf_with_its_own_tokenizer(smollm2_dir, wiki_sample, tmp_path):
    """A GGUF input calibrates like the HF folder converted from it: same windows (its embedded
    tokenizer gives the same ids), statistics equal up to the folder's bf16 rounding of the weights."""
    from qtool.calib.stats import CalibStats
    from qtool.model.smollm2 import ensure_smollm2_gguf

    gguf_path = ensure_smollm2_gguf(smollm2_dir.parent)
    stats = {}
    for label, model in (("gguf", gguf_path), ("folder", smollm2_dir)):
        stats[label] = tmp_path / f"{label}.safetensors"
        r = invoke_cli("calibrate", model, "--dataset", wiki_sample, "--samples", 2, "--seq-len", 32, "--no-hessian",
                       "-o", stats[label], "--json")
        assert r.exit_code == 0, r.output
    a, b = CalibStats(stats["gguf"]), CalibStats(stats["folder"])
    assert a.calibration["tokens"] == b.calibration["tokens"] == 64 and set(a.modules) == set(b.modules)
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        x, y = a.vector(m, "sum_x2"), b.vector(m, "sum_x2")
        assert float((x - y).norm() / y.norm()) < 0.05, m
