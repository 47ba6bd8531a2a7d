"""AWQ (-m awq): folds found in the module graph leave the float model's function unchanged;
AWQ beats round-to-nearest; its output loads in transformers + compressed-tensors with our
logits; bad input fails cleanly (one line, exit code, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke_cli

SAMPLES, SEQ = 4, 64
ARGS = ("-b", "4", "-g", "32", "--json", "-q")


@pytest.fixture(scope="module")
def runs(tiny_byte_llama, wiki_sample, tmp_path_factory):
    """runs(method, *extra) -> (folder, --json report); each once per module."""
    made: dict[tuple, tuple] = {}

    def get(method: str, *extra: str):
        key = (method, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp("awq") / "q"
            calib = ("--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ) if method != "rtn" else ()
            r = invoke_cli("quantize", tiny_byte_llama, "-m", method, "--asym", *calib, *ARGS, *extra, "-o", out)
            assert r.exit_code == 0, r.output
            made[key] = (out, json.loads(r.stdout))
        return made[key]

    return get


def _block0(folder):
    """(decoder block 0 of the float model, its BlockInputs on 2 random samples), captured as the
    engine captures them (engine/blockwise.py capture_layer_inputs) but on the whole float model."""
    from transformers import AutoModelForCausalLM

    from qtool.engine.blockwise import capture_layer_inputs
    from qtool.methods.base import BlockInputs

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden, calls = capture_layer_inputs(model, model.model.layers, ids)
    return model.model.layers[0], BlockInputs("model.layers.0", hidden, calls[0], torch.device("cpu"))


@pytest.mark.parametrize("arch,kinds", [
    ("llama-mha", {"self_attn.q_proj": "norm", "self_attn.o_proj": "rows", "mlp.gate_proj": "norm", "mlp.down_proj": "rows"}),
    ("llama", {"self_attn.q_proj": "norm", "self_attn.o_proj": None, "mlp.gate_proj": "norm", "mlp.down_proj": "rows"}),
    ("gemma2", {"self_attn.q_proj": "norm1p", "mlp.gate_proj": "norm1p", "mlp.down_proj": "rows"}),
    ("phi3", {"self_attn.qkv_proj": "norm", "self_attn.o_proj": None, "mlp.gate_up_proj": "norm", "mlp.down_proj": None}),
])
def test_folds_come_from_the_graph_and_leave_the_float_block_unchanged(arch, kinds, tmp_path):
    """Which module takes 1/s comes from the forward (verified numerically), never from names:
    RMSNorm (w / s), Gemma's (1 + w) norm ((1 + w') = (1 + w) / s), v_proj rows for o_proj where
    head shapes allow (not with grouped KV heads), up_proj rows for down_proj (not through phi3's
    fused gate_up, whose rows also feed the activation). Folding random scales leaves the float
    block's outputs unchanged up to float32 round-off (relative 1e-5)."""
    from tiny_models import build_tiny, build_tiny_with_byte_tokenizer

    from qtool.engine.block_engine import input_groups
    from qtool.methods.awq import AWQMethod
    from qtool.methods.awq_fold import discover_folds

    if arch == "llama-mha":
        folder = build_tiny_with_byte_tokenizer(tmp_path / "m", num_key_value_heads=4)
    else:
        folder = build_tiny(arch, tmp_path / "m")
    block, inputs = _block0(folder)
    linears = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    groups, _ = input_groups(block, inputs, linears)
    folds = discover_folds(block, inputs, groups)
    got = {first: (f.kind if f else None) for first, f in folds.items()}
    assert {k: got[k] for k in kinds} == kinds
    before = inputs.run(block)
    g = torch.Generator().manual_seed(1)
    chosen = {g0[0]: (0.5, 0.25 + 3 * torch.rand(block.get_submodule(g0[0]).in_features, generator=g), 0.0, 0.0) for g0 in groups}
    changed = AWQMethod._apply(block, groups, folds, chosen)
    assert changed and all(not torch.equal(t, t * 0) for t in changed.values())
    after = inputs.run(block)
    for a, b in zip(before, after):
        assert float((a - b).norm() / a.norm()) < 1e-5


def test_awq_beats_rtn_on_held_out_text(runs, tiny_byte_llama, wiki_sample):
    """Same bits, group size and asymmetric grid: AWQ's KL divergence to the float model on the
    held-out half of the text is below RTN's, and every group's output error (the search loss) is
    at most RTN's (α = 0 is RTN, so the search cannot do worse; clipping only lowers it)."""
    from qtool.evaluate import evaluate_checkpoint

    kl = {}
    for method in ("awq", "rtn"):
        out, rep = runs(method)
        kl[method] = evaluate_checkpoint(out, wiki_sample, base=tiny_byte_llama, part="eval", seq_len=SEQ, max_windows=8).kld_mean
    assert kl["awq"] < 0.9 * kl["rtn"], kl
    _, rep = runs("awq")
    for layer in rep["layers"]:
        st = layer["gptq"]
        if st["loss_rtn"] is not None:
            assert st["loss"] <= st["loss_rtn"] * 1.001, layer["name"]


def test_output_loads_in_transformers_with_our_logits(runs, tiny_byte_llama):
    """transformers + compressed-tensors (dequantize route: asymmetric zero points) loads the AWQ
    folder; its logits equal the float architecture carrying our dequantized weights and our
    rescaled norms (bf16, as stored), to 1e-4. The folded norms differ from the checkpoint's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qtool.formats.compressed_tensors import read_dequantized

    out, rep = runs("awq")
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ref = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16).float() for k, v in read_dequantized(out).items()}
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)
    orig = load_file(str(next(tiny_byte_llama.glob("*.safetensors"))))
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(state[norm].to(torch.bfloat16), orig[norm])
    assert rep["recipe"]["symmetric"] is False and rep["recipe"]["method_params"]["alpha_grid"] == 20


def test_linears_without_a_foldable_predecessor_are_clipped_only_and_reported(runs):
    """The tiny llama has grouped KV heads: o_proj's input channels do not map one-to-one onto
    v_proj's rows, so o_proj gets clipping only, and the report says so."""
    _, rep = runs("awq")
    notes = [n for n in rep["notes"] if "clipping only" in n]
    assert len(notes) == 1 and "self_attn.o_proj" in notes[0] and "q_proj" not in notes[0], rep["notes"]
    by = {layer["name"]: layer["gptq"] for layer in rep["layers"]}
    assert by["model.layers.1.self_attn.o_proj.weight"]["scaled_into"] is None
    assert by["model.layers.1.self_attn.q_proj.weight"]["scaled_into"] == "input_layernorm"
    assert by["model.layers.1.mlp.down_proj.weight"]["scaled_into"] == "mlp.up_proj"


def test_symmetric_on_request_and_gptq_format(runs):
    out, rep = runs("awq", "--sym", "-f", "gptq")
    assert rep["recipe"]["symmetric"] is True
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["sym"] is True


# -- --stats and bad input ----------------------------------------------------------------------
def test_stats_file_drives_awq_without_calibration_data(tiny_byte_llama, wiki_sample, tmp_path):
    stats = tmp_path / "stats.safetensors"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", SAMPLES, "--seq-len", SEQ, "-o", stats)
    assert r.exit_code == 0, r.output
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "awq", "-b", "4", "-g", "32", "--stats", stats, "--json", "-q", "-o", tmp_path / "q")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["calibration"]["sequential"] is False and any("activation statistics from" in n for n in rep["notes"])
    assert all(layer["gptq"]["loss"] <= (layer["gptq"]["loss_rtn"] or 1e9) * 1.001 for layer in rep["layers"])
    vec = tmp_path / "vec.safetensors"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", 2, "--seq-len", 32, "-o", vec, "--no-hessian")
    assert r.exit_code == 0, r.output
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "awq", "-b", "4", "--stats", vec, "-o", tmp_path / "q2")
    assert r.exit_code == 2 and "Hessians" in r.output and not (tmp_path / "q2").exists(), r.output


def test_calibration_set_smaller_than_asked_is_refused(tiny_byte_llama, wiki_sample, tmp_path):
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "awq", "--dataset", wiki_sample, "--samples", 4000, "--seq-len", 512, "-o", tmp_path / "q")
    assert r.exit_code == 5 and "too few" in r.output and "--samples" in r.output and not (tmp_path / "q").exists(), r.output


def test_nan_in_a_block_stops_with_exit_4_naming_the_block(tmp_path, wiki_sample):
    """A NaN norm weight in block 1 makes its linears' inputs NaN during the search."""
    from safetensors.torch import load_file, save_file
    from tiny_models import build_tiny_with_byte_tokenizer

    folder = build_tiny_with_byte_tokenizer(tmp_path / "m")
    f = next(folder.glob("*.safetensors"))
    state = load_file(str(f))
    state["model.layers.1.post_attention_layernorm.weight"][3] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    r = invoke_cli("quantize", folder, "-m", "awq", "--dataset", wiki_sample, "--samples", 2, "--seq-len", 32, "-o", tmp_path / "q")
    line = r.output.strip()
    assert r.exit_code == 4 and "model.layers.1" in line and "NaN" in line and "\n" not in line, r.output
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob("q*"))
