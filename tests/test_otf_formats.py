"""The on-the-fly family as files: `-f bitsandbytes` (NF4 / FP4 / LLM.int8), `-f torchao`, `-f fp8`
(fine-grained 128 x 128), `-f fbgemm-fp8`, `-f eetq`.

Math and layout tests run in the project venv. The consumer tests load our folders with stock
transformers + bitsandbytes 0.50.2 + torchao 0.18 on CPU, in `.cache/otf-venv` (`make otf-venv`;
missing, they FAIL saying so: `make test` builds it), compare every Linear's weight as the loaded
kernel computes it and the logits with qtool's dequantization, and check the load report for
MISSING keys. They also run bitsandbytes' and torchao's own quantizers on the same weights.
FBGEMM FP8 and EETQ have no CPU runtime: their tensors are checked against transformers' module
definitions here, and `test_gpu_*` loads them where a CUDA GPU is present (skipped, saying why,
elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qtool.core.affine import quantize_float8_blocks
from qtool.core.lut import double_quantize, dynamic_map, nearest_level, nearest_sorted, quantize_lut, with_double_quant
from qtool.formats import bitsandbytes as bnb_fmt, eetq as eetq_fmt, fp8 as fp8_fmt, torchao as ao_fmt
from qtool.formats.hf_quantized import read_dequantized
from qtool.methods.base import LayerSpec
from qtool.methods.rtn import RTNMethod
from qtool.qtypes import get_qtype
from conftest import invoke_cli
from tiny_models import build_tiny, build_tiny_with_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OTF_PY = Path(os.environ.get("QTOOL_CACHE", ROOT / ".cache")) / "otf-venv" / "bin" / "python"
# rows and columns multiples of 128 except k/v (64 rows): FP8 tiles fit all but those
WIDE = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=1, head_dim=64)


def _run_cli(*args: object) -> SimpleNamespace:
    """The CLI in-process (a subprocess costs ~10 s of imports on the test machine)."""
    r = invoke_cli(*args)
    return SimpleNamespace(returncode=r.exit_code, stderr=r.output, stdout=r.stdout)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("otf_src") / "wide", **WIDE)


# -- the math, against pure-torch references --------------------------------------------------------
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_nearest_sorted_equals_distance_table(qtype):
    table = get_qtype(qtype).table()
    torch.manual_seed(0)
    x = torch.cat([torch.rand(20000) * 2 - 1, table])  # random values and every level exactly
    ref, fast = nearest_level(x, table), nearest_sorted(x, table)
    assert torch.equal(table[ref.long()], table[fast.long()])  # same level (FP4's +0 / -0 may swap codes)
    assert torch.equal(ref[table[ref.long()] != 0], fast[table[fast.long()] != 0])


def test_tables_and_dynamic_map_shape():
    nf4, fp4, dyn = get_qtype("nf4").table(), get_qtype("fp4").table(), dynamic_map()
    assert nf4.numel() == fp4.numel() == 16 and float(nf4.min()) == -1 and float(nf4.max()) == 1 and 0.0 in nf4.tolist()
    assert sorted(fp4.abs().tolist()) == sorted(fp4.abs().tolist()) and float(fp4.abs().max()) == 1.0
    assert dyn.numel() == 256 and torch.equal(dyn, dyn.sort().values) and float(dyn.max()) == 1.0 and 0.0 in dyn.tolist()


def test_lut_quantize_is_nearest_level_times_absmax():
    torch.manual_seed(1)
    w = torch.randn(8, 128).to(torch.bfloat16)
    w[2, :64] = 0  # an all-zero block: absmax 0, codes of 0
    qw = quantize_lut(w, get_qtype("nf4"), 64)
    g = w.float().reshape(8, 2, 64)
    amax = g.abs().amax(-1)
    ref = nearest_level(g / amax.clamp(min=1e-30).unsqueeze(-1), get_qtype("nf4").table()).reshape(8, 128)
    assert torch.equal(qw.scale, amax) and torch.equal(qw.codes, ref)
    err = (qw.dequantize(torch.float32) - w.float()).abs().max()
    assert err <= 0.2 * float(amax.max())  # NF4's widest gap is 0.30 of absmax (between -1 and -0.70): half of it


def test_double_quant_stores_the_scale_it_reports():
    torch.manual_seed(2)
    qw = quantize_lut(torch.randn(200, 640), get_qtype("fp4"), 64)  # 2000 scales: 8 nested blocks, the last partial
    dq = with_double_quant(qw)
    assert torch.equal(dq.nested.dequantize().reshape(qw.scale.shape), dq.scale) and torch.equal(dq.codes, qw.codes)
    assert dq.nested.codes.numel() == 2000 and dq.nested.absmax.numel() == 8
    rel = ((dq.scale - qw.scale).abs() / qw.scale).max()
    assert rel < 0.02  # 8-bit dynamic map of (absmax - mean): ~1 % steps near the block's peak
    assert dq.storage_bits() < qw.storage_bits()
    assert double_quantize(torch.zeros(5)).dequantize().abs().max() == 0  # an all-zero set of scales survives


def test_float8_blocks_equal_a_tile_loop():
    torch.manual_seed(3)
    w = torch.randn(200, 300).to(torch.bfloat16)  # partial tiles on both axes
    qw = quantize_float8_blocks(w, get_qtype("fp8"), (128, 128), scale_dtype=torch.float32)
    assert qw.scale.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile = w.float()[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = tile.abs().max() / 448
            assert qw.scale[i, j] == s
            want = (tile / s).to(torch.float8_e4m3fn)
            assert torch.equal(qw.codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float(), want.float())
    assert float((qw.dequantize(torch.float32) - w.float()).abs().max()) <= float(w.abs().max()) / 16  # e4m3: 3 mantissa bits


# -- pack / unpack round trips ------------------------------------------------------------------------
def _qw(qtype: str, strategy="channel", group=None, sym=True, scale_dtype=None, block=None, dq=False):
    torch.manual_seed(4)
    w = torch.randn(48, 128).to(torch.bfloat16)
    return RTNMethod().quantize(w, LayerSpec("x", get_qtype(qtype), strategy, group, sym, scale_dtype, block, dq))


@pytest.mark.parametrize("qtype, dq", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)], ids=["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_bnb_4bit_round_trip(qtype, dq):
    qw = _qw(qtype, "group", 64, scale_dtype=torch.float32, dq=dq)
    t = bnb_fmt.pack_4bit(qw, "bfloat16")
    assert t["weight"].shape == (48 * 128 // 2, 1) and t["weight"].dtype == torch.uint8
    assert int(t["weight"][0, 0]) == int(qw.codes[0, 0]) << 4 | int(qw.codes[0, 1])  # first code in the high nibble
    assert t["weight.absmax"].dtype == (torch.uint8 if dq else torch.float32)
    state = json.loads(bytes(t[f"weight.quant_state.bitsandbytes__{qtype}"].tolist()))
    assert state["shape"] == [48, 128] and state["blocksize"] == 64 and state["dtype"] == "bfloat16"
    back = bnb_fmt.unpack_4bit(t, "x")
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))


def test_bnb_int8_and_eetq_and_fp8_round_trips():
    qw = _qw("int8", scale_dtype=torch.float32)
    back = bnb_fmt.unpack_int8(bnb_fmt.pack_int8(qw))
    torch.testing.assert_close(back.dequantize(torch.float32), qw.dequantize(torch.float32), rtol=2**-22, atol=0)  # SCB = 127 s
    qw = _qw("int8", scale_dtype=torch.float16)
    t = eetq_fmt.EETQWriter().pack("m", qw)
    assert t["m.weight"].shape == (128, 48) and t["m.weight_scales"].shape == (48,) and t["m.weight_scales"].dtype == torch.float16
    assert torch.equal(t["m.weight"].t(), qw.codes)
    qw = _qw("fp8", "block", scale_dtype=torch.float32, block=(128, 128))
    t = fp8_fmt.FineGrainedFP8Writer().pack("m", qw)
    assert t["m.weight"].dtype == torch.float8_e4m3fn and t["m.weight_scale_inv"].shape == (1, 1)


@pytest.mark.parametrize("qtype, strategy, group, sym", [("int8", "channel", None, True), ("int4", "group", 32, True),
                                                         ("int4", "group", 32, False), ("int2", "group", 64, True), ("fp8", "channel", None, True)],
                         ids=["int8", "int4-g32", "int4-g32-asym", "int2-g64", "fp8"])
def test_torchao_round_trip(qtype, strategy, group, sym):
    qw = _qw(qtype, strategy, group, sym, scale_dtype=torch.float32 if qtype in ("int8", "fp8") else None)
    meta = ao_fmt.tensor_metadata(qw, "bfloat16", False)
    back = ao_fmt.unpack_torchao(meta, ao_fmt.pack_torchao(qw), "x")
    assert back.qtype == qw.qtype and torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))
    assert meta["_data"]["block_size"] == [1, group or 128]


# -- transformers' module definitions: FP8Linear, FbgemmFp8Linear, EetqLinear ------------------------
@pytest.mark.parametrize("fmt", ["fp8", "fbgemm-fp8", "eetq"])
def test_layout_matches_transformers_modules(wide, tmp_path, fmt):
    """Every tensor transformers' quantized module (built from its own class, on CPU) expects is in
    our file with its shape and dtype, and every plain Linear is in modules_to_not_convert."""
    from safetensors import safe_open
    from transformers.integrations.eetq import EetqLinear
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear
    from transformers.integrations.finegrained_fp8 import FP8Linear

    out = tmp_path / fmt
    p = _run_cli("quantize", wide, "-f", fmt, "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    skip = set(qcfg["modules_to_not_convert"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    st_dtype = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.int8: "I8", torch.float16: "F16"}
    linears = {k[: -len(".weight")]: s for k, (s, _) in stored.items() if k.endswith(".weight") and ".layers." in k and len(s) == 2}
    if fmt == "eetq":
        linears = {m: s[::-1] if m not in skip else s for m, s in linears.items()}
    checked = 0
    for m, (out_f, in_f) in linears.items():
        if m in skip:
            assert stored[m + ".weight"][1] == "BF16"
            continue
        module = {"fp8": lambda: FP8Linear(in_f, out_f, block_size=(128, 128)), "fbgemm-fp8": lambda: FbgemmFp8Linear(in_f, out_f, bias=False),
                  "eetq": lambda: EetqLinear(in_f, out_f)}[fmt]()
        for name, t in module.state_dict().items():
            assert stored[f"{m}.{name}"] == (tuple(t.shape), st_dtype[t.dtype]), (m, name)
        checked += 1
    assert checked == (10 if fmt == "fp8" else 14)  # fp8: q/o/gate/up/down of 2 layers fit 128 x 128; k/v (64 rows) do not
    assert "lm_head" in skip
    if fmt == "fp8":
        assert skip >= {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kv"}
        assert "kept in full precision" in json.loads((out / "qtool.json").read_text())["report"]["notes"][0]


# -- refusals, before anything is written -------------------------------------------------------------
@pytest.mark.parametrize("args, code, words", [
    (["-f", "bitsandbytes", "-b", "4"], 3, ["nf4, fp4", "int8"]),
    (["-f", "bitsandbytes", "--qtype", "nf4", "-g", "32"], 3, ["32", "64, 128, 256"]),
    (["-f", "bitsandbytes", "--qtype", "int8", "-g", "64"], 3, ["LLM.int8", "channel"]),
    (["-f", "bitsandbytes", "--qtype", "int8", "--double-quant"], 3, ["--double-quant", "nf4"]),
    (["-f", "torchao", "--qtype", "int4"], 3, ["group", "IntxWeightOnly"]),
    (["-f", "torchao", "--qtype", "int4", "-g", "32", "--activations", "int8"], 3, ["--activations", "int4"]),
    (["-f", "torchao", "--activations", "fp8"], 2, ["--activations", "int8"]),
    (["-f", "eetq", "-b", "4"], 3, ["eetq", "int8"]),
    (["-f", "fp8", "--qtype", "int8"], 3, ["fp8", "--qtype fp8"]),
    (["-f", "compressed-tensors", "--qtype", "nf4"], 3, ["nf4"]),
    (["-f", "gptq", "--qtype", "nf4"], 3, ["nf4"]),
    (["-f", "torchao", "--double-quant"], 2, ["--double-quant", "torchao"]),
], ids=["bnb-int4", "bnb-g32", "bnb-int8-group", "bnb-int8-dq", "ao-int4-channel", "ao-act-int4", "ao-act-bad",
        "eetq-int4", "fp8-int8", "ct-nf4", "gptq-nf4", "ao-double-quant"])
def test_refusals(wide, tmp_path, args, code, words):
    p = _run_cli("quantize", wide, *args, "-o", tmp_path / "q")
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr and all(w in p.stderr for w in words), p.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, words", [
    (["-f", "fp8"], ["every layer", "48, 96, 160"]),  # hidden 96: no layer fits 128 x 128 tiles
    (["-f", "bitsandbytes", "--qtype", "nf4"], ["not a multiple of the block size 64", "--ignore"]),  # width 96 = 1.5 blocks
], ids=["fp8-all-skipped", "bnb-width"])
def test_shape_refusals(tmp_path, args, words):
    src = build_tiny("llama", tmp_path / "llama")
    p = _run_cli("quantize", src, *args, "-o", tmp_path / "q")
    assert p.returncode == 3 and all(w in p.stderr for w in words), p.stderr
    assert not (tmp_path / "q").exists()


# -- the consumers: transformers + bitsandbytes / torchao / (FP8: transformers alone) on CPU ------------
CASES = {
    # id: (qtool args, kernel class transformers builds, max |Δ| of logits vs. our dequantized model)
    "bnb-nf4-dq": (["-f", "bitsandbytes", "--qtype", "nf4", "--double-quant"], "Linear4bit", 0.15),
    "bnb-fp4": (["-f", "bitsandbytes", "--qtype", "fp4"], "Linear4bit", 0.15),
    "bnb-nf4-g128": (["-f", "bitsandbytes", "--qtype", "nf4", "-g", "128", "--ignore", "*down_proj"], "Linear4bit", 0.15),
    # LLM.int8 quantizes activations too (per row, outliers > 6 in fp16): logits move more
    "bnb-int8": (["-f", "bitsandbytes", "--qtype", "int8"], "Linear8bitLt", 0.4),
    "ao-int8": (["-f", "torchao", "--qtype", "int8"], "Linear[Int8Tensor]", 0.15),
    "ao-int8-dyn": (["-f", "torchao", "--qtype", "int8", "--activations", "int8"], "Linear[Int8Tensor]", 0.4),
    "ao-int4-g32": (["-f", "torchao", "--qtype", "int4", "-g", "32"], "Linear[IntxUnpackedToInt8Tensor]", 0.15),
    "ao-int4-g64-asym": (["-f", "torchao", "--qtype", "int4", "-g", "64", "--asym"], "Linear[IntxUnpackedToInt8Tensor]", 0.15),
    "ao-fp8": (["-f", "torchao", "--qtype", "fp8"], "Linear[Float8Tensor]", 0.15),
    # 384 is no multiple of 256: the model-wide group is lowered to 128 (said in the notes, and in the config)
    "ao-int4-g256": (["-f", "torchao", "--qtype", "int4", "-g", "256"], "Linear[IntxUnpackedToInt8Tensor]", 0.15),
    "fp8-blocks": (["-f", "fp8"], None, 0.15),  # dequantized to bf16 while loading: plain Linear layers
}


def _in_otf_venv(script: str, out: Path, *args: object) -> dict:
    if not OTF_PY.exists():
        pytest.fail(f"{OTF_PY} missing: `make otf-venv` installs transformers + bitsandbytes + torchao there (make test does)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the consumer venv's own packages only
    p = subprocess.run([str(OTF_PY), str(ROOT / "tests" / script), str(out), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def consumed(wide, tmp_path_factory):
    """Quantize every case, then load them all in one otf-venv process."""
    root = tmp_path_factory.mktemp("otf_out")
    outs = {}
    for case, (args, _, _) in CASES.items():
        p = _run_cli("quantize", wide, *args, "-o", root / case, "-q")
        assert p.returncode == 0, p.stderr
        outs[case] = root / case
    got = _in_otf_venv("gptq_consumer.py", root / "consumer.pt", *outs.values())
    return {case: (outs[case], got[str(out)]) for case, out in outs.items()}


@pytest.fixture(scope="module")
def reference(wide, tmp_path_factory):
    """bitsandbytes' and torchao's own quantizers on the block linears of `wide`."""
    return _in_otf_venv("otf_reference.py", tmp_path_factory.mktemp("otf_ref") / "reference.pt", wide)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_our_output(consumed, wide, case):
    from transformers import AutoModelForCausalLM

    args, kernel, logit_tol = CASES[case]
    out, got = consumed[case]
    assert got["loading_info"].get("missing_keys") == [] and got["loading_info"].get("unexpected_keys") == [], got["loading_info"]
    assert got["kernels"] == ([kernel] if kernel else [])
    state = read_dequantized(out)
    ref_model = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32)
    result = ref_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    # 1. every Linear computes with our dequantized weight (or, left in full precision, the original),
    #    rounded to bf16: exact where the kernel dequantizes to float32 first (bitsandbytes 4-bit,
    #    torchao intx/fp8), within one bf16 rounding where it multiplies q by s in bf16/fp16 (int8)
    assert set(got["linears"]) == {n for n, m in ref_model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, w in got["linears"].items():
        want = state[name + ".weight"].to(torch.bfloat16).float()
        torch.testing.assert_close(w, want, rtol=2**-7, atol=2**-8 * float(want.abs().max()))
    # 2. logits against the original model carrying our dequantized weights, both bf16 (logits ~5;
    #    summation order differs; LLM.int8 and dynamic int8 also quantize activations); the
    #    quantization error itself is larger (checked below), so a wrong layout cannot pass
    with torch.no_grad():
        want = ref_model.to(torch.bfloat16)(got["ids"]).logits[0].float()
        orig = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.bfloat16)(got["ids"]).logits[0].float()
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=logit_tol)
    assert (got["logits"] - want).abs().max() < (got["logits"] - orig).abs().max() or "int8" in case


def test_bitsandbytes_quantizer_gives_our_codes(reference, wide):
    """bitsandbytes' quantize_4bit on the same weights: NF4/FP4 packed codes and absmax bit for bit,
    and with double quantization the nested 8-bit codes too: its CPU kernel reads them from a
    65536-bin table (core/lut.py, bnb_cpu_nearest), which for absmax values near a midpoint of the
    dynamic map is one entry off the exact nearest; -f bitsandbytes asks for that table."""
    from safetensors import safe_open

    ref = reference
    method = RTNMethod()
    off = 0
    with safe_open(str(wide / "model.safetensors"), "pt") as f:
        for name, r in ref.items():
            w = f.get_tensor(name)
            for qt in ("nf4", "fp4"):
                t = bnb_fmt.pack_4bit(method.quantize(w, LayerSpec(name, get_qtype(qt), "group", 64, True, torch.float32)), "bfloat16")
                assert torch.equal(t["weight"], r[f"bnb:{qt}"]["packed"]) and torch.equal(t["weight.absmax"], r[f"bnb:{qt}"]["absmax"]), (name, qt)
            spec = LayerSpec(name, get_qtype("nf4"), "group", 64, True, torch.float32, double_quant=True, rounding="bitsandbytes")
            qw = method.quantize(w, spec)
            t, R = bnb_fmt.pack_4bit(qw, "bfloat16"), r["bnb:nf4-dq"]
            assert torch.equal(t["weight"], R["packed"]) and torch.equal(t["weight.nested_absmax"], R["nested_absmax"])
            assert torch.equal(t["weight.absmax"], R["absmax"]), name
            assert qw.nested.offset == float(R["offset"])
            exact = method.quantize(w, LayerSpec(name, get_qtype("nf4"), "group", 64, True, torch.float32, double_quant=True))
            off += int((exact.nested.codes != qw.nested.codes).sum())
    assert off > 0  # the table's choice differs from the exact nearest somewhere: the test tells them apart


AO_LAYOUTS = {"ao:int8": ("int8", "channel", None, True, torch.float32), "ao:int4-g32": ("int4", "group", 32, True, None),
              "ao:int4-g64-asym": ("int4", "group", 64, False, None), "ao:fp8": ("fp8", "channel", None, True, torch.float32)}


def test_torchao_quantizer_gives_our_codes(reference, wide):
    """torchao's quantize_ on the same weights: with torchao's arithmetic (core/peer_rtn.py: scale
    and w * (1 / s) in the weight's bf16, zero point added after rounding) qtool's codes, scales
    and zero points are torchao's bit for bit; qtool's plain float32 RTN lands elsewhere on some."""
    from safetensors import safe_open

    ref, method = reference, RTNMethod()
    plain_differs = 0
    with safe_open(str(wide / "model.safetensors"), "pt") as f:
        for name, r in ref.items():
            w = f.get_tensor(name)
            for key, (qt, strategy, g, sym, sd) in AO_LAYOUTS.items():
                t = ao_fmt.pack_torchao(method.quantize(w, LayerSpec(name, get_qtype(qt), strategy, g, sym, sd, rounding="torchao")))
                R = r[key]
                assert t["scale"].dtype == R["scale"].dtype and torch.equal(t["scale"], R["scale"].reshape(t["scale"].shape)), (name, key)
                assert torch.equal(t["qdata"].view(torch.uint8), R["qdata"].view(torch.uint8)), (name, key)
                if "zero_point" in R:
                    assert torch.equal(t["zero_point"], R["zero_point"].reshape(t["zero_point"].shape)), (name, key)
                plain = ao_fmt.pack_torchao(method.quantize(w, LayerSpec(name, get_qtype(qt), strategy, g, sym, sd)))
                plain_differs += not torch.equal(plain["qdata"].view(torch.uint8), R["qdata"].view(torch.uint8))
    assert plain_differs > 0


@pytest.mark.parametrize("case, key", [("ao-int8", "ao:int8"), ("ao-int4-g32", "ao:int4-g32"), ("ao-int4-g64-asym", "ao:int4-g64-asym"),
                                       ("ao-fp8", "ao:fp8"), ("bnb-nf4-dq", "bnb:nf4-dq"), ("bnb-fp4", "bnb:fp4")])
def test_written_files_hold_the_libraries_own_quantization(consumed, reference, case, key):
    """The CLI's files (the format asks RTN for its runtime's arithmetic) hold, tensor for tensor,
    what bitsandbytes' / torchao's own quantizer makes of the same weights."""
    from safetensors import safe_open

    out, _ = consumed[case]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, r in reference.items():
            R, prefix = r[key], name[: -len(".weight")]
            if key.startswith("ao:"):
                for k, want in R.items():
                    got = f.get_tensor(f"{prefix}._weight_{k}")
                    assert got.dtype == want.dtype and torch.equal(got.reshape(want.shape).view(torch.uint8), want.view(torch.uint8)), (name, k)
            else:
                assert torch.equal(f.get_tensor(name), R["packed"]) and torch.equal(f.get_tensor(name + ".absmax"), R["absmax"]), name
                if "nested_absmax" in R:
                    assert torch.equal(f.get_tensor(name + ".nested_absmax"), R["nested_absmax"])


def test_torchao_lowered_group_is_said_and_written(consumed):
    """-g 256 on rows of 384: torchao itself fails on PerGroup(256); qtool lowers the model-wide group
    to 128 and says so in its report (summary, --json, card), and the config's PerGroup is 128, the
    group the tensors hold. --strict-groups refuses instead (test below)."""
    out, got = consumed["ao-int4-g256"]
    rep = json.loads((out / "qtool.json").read_text())["report"]
    assert any("group size 128 instead of 256" in n for n in rep["notes"]), rep["notes"]
    assert "group size 128 instead of 256" in (out / "README.md").read_text()
    qt = json.loads((out / "config.json").read_text())["quantization_config"]["quant_type"]["default"]
    assert qt["_data"]["granularity"]["_data"]["group_size"] == 128
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["model.layers.0.mlp.down_proj.weight"])
    assert meta["_data"]["block_size"] == [1, 128]


def test_torchao_strict_groups_refuses(wide, tmp_path):
    p = _run_cli("quantize", wide, "-f", "torchao", "--qtype", "int4", "-g", "256", "--strict-groups", "-o", tmp_path / "q")
    assert p.returncode == 3 and "not a multiple of --group-size 256" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "q").exists()


# -- inspect, export, eval ---------------------------------------------------------------------------
@pytest.mark.parametrize("case, label, bits", [("bnb-nf4-dq", "nf4 g64 dq", (4.1, 4.8)), ("bnb-int8", "int8 channel (LLM.int8)", (8.0, 8.2)),
                                               ("ao-int4-g32", "int4 g32 sym", (8.5, 8.8)), ("fp8-blocks", "fp8 128x128 blocks", (8.0, 8.01))])
def test_inspect_reads_them(consumed, wide, case, label, bits):
    from qtool.inspect import inspect_model

    out, _ = consumed[case]
    rep = inspect_model(str(out))
    base = inspect_model(str(wide))
    assert sum(t.params for t in rep.tensors) == sum(t.params for t in base.tensors)  # every parameter, none twice
    rows = {t.name: t for t in rep.tensors}
    q = rows["model.layers.0.mlp.up_proj.weight"]
    assert q.quantized and q.type == label and q.shape == (384, 256) and bits[0] <= q.bits <= bits[1]
    assert rows["lm_head.weight"].type == "BF16"


@pytest.mark.parametrize("case", ["bnb-nf4-dq", "ao-int4-g64-asym", "fp8-blocks"])
def test_export_dequantizes(consumed, tmp_path, case):
    from safetensors.torch import load_file

    out, _ = consumed[case]
    p = _run_cli("export", out, "-f", "safetensors", "-o", tmp_path / "plain", "-q")
    assert p.returncode == 0, p.stderr
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    want = read_dequantized(out, torch.bfloat16)
    assert plain.keys() == want.keys() and all(torch.equal(plain[k], want[k]) for k in want)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_eval_scores_bnb_through_our_dequantization(consumed, wide, tmp_path):
    """No bitsandbytes in the project venv: `qtool eval` scores qtool's dequantization (which the
    consumer test holds equal to bitsandbytes' own weights) and gets the figures of the exported
    plain checkpoint."""
    out, _ = consumed["bnb-nf4-dq"]
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    p = _run_cli("export", out, "-f", "safetensors", "-o", tmp_path / "plain", "-q")
    assert p.returncode == 0, p.stderr
    figs = []
    for model in (out, tmp_path / "plain"):
        p = _run_cli("eval", model, "--dataset", text, "--base", wide, "--seq-len", "64", "--json")
        assert p.returncode == 0, p.stderr
        figs.append(json.loads(p.stdout))
    # the folder is scored with float32 weights (as bitsandbytes computes with bnb_4bit_compute_dtype
    # float32), the export holds them rounded to the checkpoint's bf16: perplexities ~530 agree to 0.5 %
    assert figs[0]["perplexity"] == pytest.approx(figs[1]["perplexity"], rel=5e-3) and figs[0]["kld_mean"] > 0


# -- FBGEMM FP8 and EETQ on a GPU ---------------------------------------------------------------------
GPU_PY = Path(os.environ.get("QTOOL_GPU_PYTHON", sys.executable))


def _cuda_in(python: Path) -> bool:
    p = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return p.stdout.strip() == "True"


@pytest.mark.parametrize("fmt, package", [("fbgemm-fp8", "fbgemm_gpu"), ("eetq", "kernels")])
def test_gpu_loads_fbgemm_fp8_and_eetq(wide, tmp_path, fmt, package):
    """On a CUDA machine (QTOOL_GPU_PYTHON: a python with CUDA torch, transformers, accelerate and
    fbgemm-gpu-genai / kernels + Hub access for kernels-community/quantization-eetq): load our folder
    on the GPU and compare logits and weights with qtool's dequantization."""
    if not _cuda_in(GPU_PY):
        pytest.skip(f"no CUDA GPU for {GPU_PY}: FBGEMM FP8 and EETQ have no CPU runtime; their layout is "
                    "checked by test_layout_matches_transformers_modules")
    p = subprocess.run([str(GPU_PY), "-c", f"import {package}"], capture_output=True, text=True)
    assert p.returncode == 0, f"{GPU_PY} has CUDA but not {package}: pip install fbgemm-gpu-genai / kernels"
    from transformers import AutoModelForCausalLM

    out = tmp_path / fmt
    p = _run_cli("quantize", wide, "-f", fmt, "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
              "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map='cuda', output_loading_info=True)\n"
              "ids = torch.arange(3, 27).reshape(1, -1).cuda()\n"
              "with torch.no_grad(): logits = m(ids).logits[0].float().cpu()\n"
              "torch.save({'logits': logits, 'ids': ids.cpu(), 'missing': list(info['missing_keys']), "
              "'kernels': sorted({type(x).__name__ for x in m.modules() if hasattr(x, 'in_features')})}, sys.argv[2])\n")
    p = subprocess.run([str(GPU_PY), "-c", script, str(out), str(tmp_path / "gpu.pt")], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "gpu.pt")
    assert got["missing"] == [] and ("FbgemmFp8Linear" if fmt == "fbgemm-fp8" else "EetqLinear") in got["kernels"]
    ref = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32)
    ref.load_state_dict(read_dequantized(out), strict=False)
    with torch.no_grad():
        want = ref.to(torch.bfloat16)(got["ids"]).logits[0].float()
    # FBGEMM also quantizes activations to fp8 per row: logits (~5) move by up to ~0.3
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0.4)
