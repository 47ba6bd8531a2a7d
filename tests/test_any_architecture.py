"""Any architecture transformers implements: every model of tests/tiny_models.py ZOO_NAMES (dense,
MoE with per-expert or fused experts, MLA, multimodal Gemma 3) quantized with RTN and with GPTQ
to compressed-tensors, loaded by transformers + compressed-tensors (the real consumer), and
compared with our own dequantization.

The reference is built without any per-architecture code: `read_dequantized(out)` (our unpacking,
in checkpoint names) saved as a plain checkpoint and loaded by transformers, whose own conversion
fuses MoE experts and renames Gemma 3's `language_model.model.` exactly as it does for the quantized
folder. One known quirk of the consumer is mirrored: integer MoE experts come out of its experts
path in the scale dtype (bf16, see tests/test_architectures.py), so the reference rounds those
experts' dequantized weights to bf16 too. With that, weights are bit-identical (checked) and the
logits agree to float32 noise (atol 1e-5, logits ~1).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from qtool.cli.main import app
from tiny_models import ZOO_NAMES, build_tiny

PROMPT = torch.tensor([[1, 5, 9, 33, 77, 2, 100, 14, 200, 250, 3, 64]])
METHODS = {
    "rtn": (),
    "gptq": ("-m", "gptq", "--samples", "2", "--seq-len", "32"),
}


def byte_tokenizer(folder: Path) -> None:
    """A 256-token byte-level tokenizer (the tiny models' vocabulary), for calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=sorted(vocab)[2]).save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """arch -> folder of the tiny seeded model with a byte tokenizer, built once per module."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny(arch, root / arch)
            byte_tokenizer(cache[arch])
        return cache[arch]

    return get


def auto_class(config: dict):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if config["architectures"][0].endswith("ForConditionalGeneration") else AutoModelForCausalLM


def quantize(src: Path, out: Path, args: tuple[str, ...]) -> dict:
    result = CliRunner().invoke(app, ["quantize", str(src), *args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits[0].float()


def reference_model(out: Path, state: dict[str, torch.Tensor], tmp: Path):
    """Our dequantized weights (checkpoint names) loaded by transformers as a plain checkpoint."""
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    return auto_class(config).from_pretrained(tmp, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ZOO_NAMES)
def test_compressed_tensors_any_architecture(arch, method, zoo, wiki_sample, tmp_path):
    from qtool.formats.compressed_tensors import checkpoint_schemes, read_dequantized
    from qtool.model.structure import discover, is_router

    src = zoo(arch)
    out = tmp_path / "q"
    args = ("-b", "4", "-g", "32", *METHODS[method], *(("--dataset", str(wiki_sample)) if method == "gptq" else ()))
    report = quantize(src, out, args)
    config = json.loads((out / "config.json").read_text())

    # what was quantized: every linear of the decoder blocks as transformers builds them, routers
    # excepted; nothing of a vision tower or projector; fused 3-D experts named in a note
    structure = discover(json.loads((src / "config.json").read_text()))
    want = {n for n in structure.linears() if not is_router(n[: -len(".weight")])}
    assert {r["name"] for r in report["layers"]} == want
    assert not any("vision" in n or "projector" in n for n in want)
    if structure.fused_experts():
        assert any("MoE expert tensors kept in full precision" in n for n in report["notes"]), report["notes"]
    if method == "gptq":
        assert all(r["gptq"] for r in report["layers"])
        experts = [r for r in report["layers"] if r["name"] in structure.expert_names() and ".up_proj" in r["name"]]
        assert all(r["gptq"]["shares_hessian_with"] for r in experts)  # gate and up of one expert: one input

    # the consumer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = auto_class(config).from_pretrained(out, dtype=torch.float32).eval()
    for p in loaded.parameters():  # MoE int experts come back bf16 in a float32 model (module doc)
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    got = forward(loaded)

    # our dequantization, expert weights rounded to bf16 as the consumer holds them
    state = read_dequantized(out, torch.float32)
    scheme = checkpoint_schemes(config)
    for name in structure.expert_names():
        if scheme(name[: -len(".weight")]):
            state[name] = state[name].to(torch.bfloat16).float()
    ref = reference_model(out, state, tmp_path / "ref")
    want_logits = forward(ref)
    loaded_state, ref_state = loaded.state_dict(), ref.state_dict()
    differ = [k for k, v in ref_state.items() if not torch.equal(loaded_state[k].float(), v)]
    assert not differ, f"transformers holds other weights than ours: {differ[:4]}"
    torch.testing.assert_close(got, want_logits, rtol=0, atol=1e-5)

    # teeth: quantization moved the logits well beyond the tolerance
    original = auto_class(config).from_pretrained(src, dtype=torch.float32).eval()
    assert (got - forward(original)).abs().max().item() > 1e-3


# -- GPTQ format: transformers + optimum + gptqmodel, in their own venv ------------------------------
GPTQ_CASES = [(a, m) for a in ZOO_NAMES for m in METHODS]


@pytest.fixture(scope="module")
def gptq_consumed(zoo, wiki_sample, tmp_path_factory, request):
    """Every selected architecture x method written as GPTQ, then all loaded in one GPTQ-venv process."""
    import os
    import subprocess

    from test_gptq_format import GPTQ_PY, ROOT

    if not GPTQ_PY.exists():
        pytest.skip(f"{GPTQ_PY} missing: `make gptq-venv` installs transformers + optimum + gptqmodel there")
    root = tmp_path_factory.mktemp("gptq_any")
    outs, reports = {}, {}
    selected = {(i.callspec.params["arch"], i.callspec.params["method"]) for i in request.session.items
                if getattr(i, "originalname", None) == "test_gptq_format_any_architecture"}
    for arch, method in [c for c in GPTQ_CASES if c in selected]:
        out = root / f"{arch}-{method}"
        extra = ("--dataset", str(wiki_sample)) if method == "gptq" else ()
        reports[(arch, method)] = quantize(zoo(arch), out, ("-f", "gptq", "-b", "4", "-g", "32", *METHODS[method], *extra))
        outs[(arch, method)] = out
    result = root / "consumer.pt"
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([str(GPTQ_PY), str(ROOT / "tests" / "gptq_consumer.py"), str(result), *map(str, outs.values())],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(result)
    return {case: (outs[case], reports[case], got[str(out)]) for case, out in outs.items()}


@pytest.mark.parametrize("arch, method", GPTQ_CASES, ids=[f"{a}-{m}" for a, m in GPTQ_CASES])
def test_gptq_format_any_architecture(arch, method, gptq_consumed, zoo, tmp_path):
    from qtool.formats.gptq import read_dequantized
    from qtool.model.structure import discover, is_router

    out, report, got = gptq_consumed[(arch, method)]
    structure = discover(json.loads((zoo(arch) / "config.json").read_text()))
    # what GPTQ loaders hold quantized: the decoder blocks' nn.Linear layers (not the experts
    # transformers fuses on load, which stay full precision, said in a note)
    want = {n for n in structure.linears() if not is_router(n[: -len(".weight")]) and n not in structure.expert_names()}
    assert {r["name"] for r in report["layers"]} == want
    if structure.expert_names():
        assert any("MoE expert linears kept in full precision" in n for n in report["notes"]), report["notes"]
    # 1. every module the loader made quantized computes with our dequantization (rounded to bf16;
    #    tolerances as in tests/test_gptq_format.py), and it is every module we quantized
    state = read_dequantized(out)
    memory = {structure.memory_module(n[: -len(".weight")]): n for n in want}
    assert set(got["weights"]) == set(memory), sorted(set(got["weights"]) ^ set(memory))[:4]
    for name, w in got["weights"].items():
        ref = state[memory[name]]
        torch.testing.assert_close(w, ref.to(torch.bfloat16).float(), rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    # 2. logits: transformers with our dequantized weights (a plain checkpoint), both in bf16;
    #    summation order differs, atol 0.1 on logits ~1-3 (quantization itself moves them ~1).
    #    MoE: a router's top-k can flip between two near-equal experts under that bf16 noise (seen:
    #    mixtral-gptq at position 13 of 24, 0.97, and, through attention, later positions by
    #    0.1-0.25; qwen2_moe-rtn at position 6, 0.26). There the weights (each module checked above)
    #    are the proof, and of the logits at least half of the positions must agree within 0.1.
    ref = reference_model(out, state, tmp_path / "ref").to(torch.bfloat16)
    with torch.no_grad():
        want_logits = ref(got["ids"]).logits[0].float()
    per_position = (got["logits"] - want_logits).abs().amax(-1)
    if structure.expert_names() or structure.fused_experts():
        assert int((per_position <= 0.1).sum()) * 2 >= len(per_position), per_position
    else:
        assert (per_position <= 0.1).all(), per_position
