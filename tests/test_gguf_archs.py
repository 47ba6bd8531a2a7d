"""GGUF for the architectures beyond llama (qwen3, qwen3moe, gemma3 text and multimodal, smollm3,
olmo2, granite, deepseek2/MLA, gpt-oss, phi3 LongRoPE): written, read back, and proven by llama.cpp.

* round trip: our F32 file read back by GGUFSource equals the checkpoint, tensor for tensor;
* llama.cpp (the `llama_cpp` binding of the vendored tree) loads each F32 file and its next-token
  logits match transformers';
* (slow, with SmolLM2's tokenizer) our BF16 file equals convert_hf_to_gguf.py's, tensor bytes and
  metadata, and our Q8_0 / Q4_K_M files equal llama-quantize's on that file;
* refusals (what llama.cpp hard-codes and a config could set otherwise) from the config alone.

Skipped, naming the missing piece, where the binding or the tools are not built.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import CACHE
from qtool.errors import UnsupportedError
from qtool.model.gguf_source import GGUFSource
from qtool.model.resolve import open_source
from test_gguf_llama_cpp import binding, convert, hf_logits  # noqa: F401 (binding: a fixture)
from tiny_models import build_tiny_with_tokenizer_of, make_config, save_random

lct = pytest.importorskip("llama_cpp_tools")
PROMPT = [1, 5, 9, 33, 77, 2, 100, 14, 200, 255, 3, 64]
ARCHS = ["qwen3", "qwen3_moe", "gemma3_text", "gemma3", "smollm3", "olmo2", "granite", "deepseek_v3", "gpt_oss", "phi3_longrope"]
# Overrides of tiny_models' configs: what llama.cpp hard-codes (smollm3: RoPE-less every 4th layer;
# DeepSeek-V3's sigmoid routing, which its real configs state), windows short enough that the
# 12-token prompt crosses them, and the gemma3 sliding layout of tiny_models (one local, one
# global layer: not llama.cpp's default, so the file says so).
OVERRIDES = {
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4, no_rope_layers=[1, 1, 1, 0],
                    layer_types=["full_attention"] * 4),
    "gemma3_text": dict(sliding_window=4),
    # llama.cpp's YaRN rounds its correction range (ggml_rope_yarn_corr_dims: floor/ceil), which is
    # transformers' `truncate: true`; gpt-oss configs say false (a small difference, not expressible
    # in GGUF): the tiny model says true so that only what GGUF can hold is compared
    "gpt_oss": dict(sliding_window=4, rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                           truncate=True, original_max_position_embeddings=4096,
                                                           rope_theta=150000.0)),
    "deepseek_v3": dict(scoring_func="sigmoid"),
    "qwen3_moe": dict(norm_topk_prob=True),  # what Qwen3-MoE checkpoints say, and llama.cpp does
}
# LongRoPE (Phi-3 128k style): factors per frequency, a context 32x the original one. The original
# context is short so that both runtimes use the long factors on a 24-token prompt (transformers
# switches past original_max_position_embeddings tokens, llama.cpp when its context is longer)
HEAD_DIM_PHI3 = 96 // 4
LONGROPE = dict(max_position_embeddings=512, original_max_position_embeddings=16,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=1.0,
                                     long_factor=[1.0 + 0.25 * i for i in range(HEAD_DIM_PHI3 // 2)],
                                     short_factor=[1.0 + 0.01 * i for i in range(HEAD_DIM_PHI3 // 2)],
                                     original_max_position_embeddings=16))


def tiny_config(arch: str, **extra):
    if arch == "phi3_longrope":
        cfg = make_config("phi3")
        for k, v in LONGROPE.items():
            setattr(cfg, k, v)
        return cfg
    cfg = make_config(arch)
    text = getattr(cfg, "text_config", None) or cfg
    for k, v in {**OVERRIDES.get(arch, {}), **extra}.items():
        setattr(text, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_random(tiny_config(arch), tmp_path_factory.mktemp(f"tiny-{arch}"), 1234)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def f32_files(tiny, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = convert(tiny(arch), tmp_path_factory.mktemp(f"f32-{arch}") / "m.gguf", "F32")
        return made[arch]

    return get


def fields(path: Path) -> dict:
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


# -- the file's layout --------------------------------------------------------------------------------


def rebuilt_logits(back: GGUFSource, ids: list[int]) -> np.ndarray:
    """The model transformers builds from a GGUFSource's config and tensors (what `qtool export
    FILE.gguf -f safetensors` writes), run on `ids`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(back.config)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k not in ("dtype", "torch_dtype")})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {m.name: back.get_tensor(m.name) for m in back.tensors()}
    with tempfile.TemporaryDirectory() as d:  # through save/load: the checkpoint layout transformers reads
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, f"{d}/model.safetensors")
        cfg.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3"])
def test_round_trip_through_gguf_source(tiny, f32_files, arch):
    """F32 file -> GGUFSource: every checkpoint tensor back under its own name, bit for bit (gemma's
    norms to within the float32 rounding of `+1 -1`), and a config from which transformers builds a
    model with the original's logits (same weights, same arithmetic: 1e-4 allows the norm rounding
    and LongRoPE factors rounded to float32)."""
    back = GGUFSource(f32_files(arch), dtype=torch.float32)
    with open_source(str(tiny(arch))) as src:
        assert {m.name for m in back.tensors()} == {m.name for m in src.tensors()}
        for m in src.tensors():
            ref, got = src.get_tensor(m.name).float(), back.get_tensor(m.name)
            if arch.startswith("gemma3") and m.name.endswith("norm.weight"):
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got, ref), m.name
    np.testing.assert_allclose(rebuilt_logits(back, PROMPT), hf_logits(tiny(arch), PROMPT), atol=1e-4, rtol=0)


def test_moe_and_mla_tensors(f32_files, tiny):
    """qwen3moe: experts stacked to [E, rows, cols]; deepseek2: kv_b_proj split per head into
    attn_k_b (transposed) and attn_v_b, MQA metadata; gpt-oss: interleaved gate/up rows of the
    transposed fused experts, sinks."""
    def tensors(arch):
        return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
                .reshape(tuple(int(d) for d in reversed(t.shape.tolist()))) for t in gguf.GGUFReader(f32_files(arch)).tensors}

    with open_source(str(tiny("qwen3_moe"))) as src:
        got = tensors("qwen3_moe")
        up = torch.stack([src.get_tensor(f"model.layers.1.mlp.experts.{e}.up_proj.weight").float() for e in range(4)])
        assert torch.equal(got["blk.1.ffn_up_exps.weight"], up)
    with open_source(str(tiny("deepseek_v3"))) as src:
        got = tensors("deepseek_v3")
        kv = src.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").float().reshape(4, 16 + 24, 32)
        assert torch.equal(got["blk.1.attn_k_b.weight"], kv[:, :16].transpose(1, 2))
        assert torch.equal(got["blk.1.attn_v_b.weight"], kv[:, 16:])
        assert "blk.1.exp_probs_b.bias" in got and "blk.0.ffn_gate.weight" in got  # first layer dense
    f = fields(f32_files("deepseek_v3"))
    assert f["deepseek2.attention.head_count_kv"] == 1 and f["deepseek2.attention.key_length"] == 32 + 16
    assert f["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    with open_source(str(tiny("gpt_oss"))) as src:
        got = tensors("gpt_oss")
        gate_up = src.get_tensor("model.layers.0.mlp.experts.gate_up_proj").float().transpose(-1, -2)
        assert torch.equal(got["blk.0.ffn_gate_exps.weight"], gate_up[:, 0::2])
        assert torch.equal(got["blk.0.ffn_up_exps.weight"], gate_up[:, 1::2])
        assert got["blk.0.attn_sinks.weight"].shape == (4,)


def test_gemma3_multimodal_keeps_the_language_model(tiny, f32_files):
    """Gemma3ForConditionalGeneration: the text model's tensors under gemma3 names, no vision tower or
    projector (llama.cpp takes those from a separate mmproj file), text hyper-parameters."""
    names = {t.name for t in gguf.GGUFReader(f32_files("gemma3")).tensors}
    assert names == {t.name for t in gguf.GGUFReader(f32_files("gemma3_text")).tensors}
    f = fields(f32_files("gemma3"))
    assert f["general.architecture"] == "gemma3" and f["gemma3.block_count"] == 2
    # tiny_models' layout (local, global) is not llama.cpp's default 5:1, so the file states it
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False]


def test_longrope_factors_are_written(f32_files):
    f = fields(f32_files("phi3_longrope"))
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(f32_files("phi3_longrope")).tensors}
    np.testing.assert_array_equal(t["rope_factors_long.weight"], np.float32(LONGROPE["rope_parameters"]["long_factor"]))
    np.testing.assert_array_equal(t["rope_factors_short.weight"], np.float32(LONGROPE["rope_parameters"]["short_factor"]))
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(32) / np.log(16)) ** 0.5)


@pytest.mark.parametrize("arch, extra, match", [
    ("smollm3", dict(num_hidden_layers=2, no_rope_layer_interval=2, no_rope_layers=[1, 0]), "every 4th"),
    ("gemma3_text", dict(query_pre_attn_scalar=48), "query_pre_attn_scalar"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "dense layers"),
])
def test_refused_from_the_config(tmp_path, arch, extra, match):
    """Configs llama.cpp would compute differently: one line, before any tensor is read, nothing written."""
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = tiny_config(arch, **extra).to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    from qtool.formats.gguf import metadata as md

    with pytest.raises(UnsupportedError, match=match):
        md.arch_spec(cfg)


# -- llama.cpp ------------------------------------------------------------------------------------------


# F32 files: the same numbers in both runtimes, only kernel rounding and summation order differ
# (measured max |diff| below 2e-3 on logits of magnitude ~1-5; 5e-3 as in test_gguf_llama_cpp).
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_match_transformers(binding, tiny, f32_files, arch):
    prompt = PROMPT * 2 if arch == "phi3_longrope" else PROMPT
    got = lct.gguf_next_token_logits(f32_files(arch), prompt)
    ref = hf_logits(tiny(arch), prompt)
    np.testing.assert_allclose(got, ref, atol=5e-3, rtol=0)


# -- against llama.cpp's converter and quantizer (SmolLM2's tokenizer: the converter needs one) ---------

CONVERT_ARCHS = ["qwen3", "qwen3_moe", "gemma3_text", "gemma3", "smollm3", "olmo2", "granite", "deepseek_v3", "gpt_oss"]
# gemma3 in the layout llama.cpp assumes (5 local : 1 global): the converter writes no layout key
GEMMA3_DEFAULT = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=4)
OUR_KEYS = {"general.quantized_by", "qtool.type", "qtool.provenance"}


@pytest.fixture(scope="module")
def tools():
    if os.environ.get("QTOOL_BUILD_LLAMA_CPP"):
        return lct.ensure_llama_cpp(CACHE)
    t = lct._tools_at(lct.key_dir(CACHE))
    if not lct._tools_ready(t):
        pytest.skip(f"llama-quantize / the converter venv not built under {lct.key_dir(CACHE)} (make llama-cpp)")
    return t


@pytest.fixture(scope="module")
def with_tokenizer(smollm2_dir, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            extra = {**OVERRIDES.get(arch, {}), **(GEMMA3_DEFAULT if arch.startswith("gemma3") else {})}
            folder = tmp_path_factory.mktemp(f"tok-{arch}") / "hf"
            made[arch] = build_tiny_with_tokenizer_of(folder, smollm2_dir, arch=arch, **extra)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def ours_bf16(with_tokenizer):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = convert(with_tokenizer(arch), with_tokenizer(arch).parent / "ours.gguf", "BF16")
        return made[arch]

    return get


@pytest.fixture(scope="module")
def pair(ours_bf16, with_tokenizer, tools):
    """(ours, theirs) BF16 files of the same folder: qtool's and convert_hf_to_gguf.py's."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            folder = with_tokenizer(arch)
            made[arch] = (ours_bf16(arch), tools.convert_hf(folder, folder.parent / "theirs.gguf", "bf16"))
        return made[arch]

    return get


def contents(path: Path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, tuple(t.shape.tolist()), t.data.tobytes()) for t in r.tensors}
    kv = {f.name: ([x.name for x in f.types], f.contents()) for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return tensors, kv


@pytest.mark.slow
@pytest.mark.parametrize("arch", CONVERT_ARCHS)
def test_bf16_file_equals_convert_hf_to_gguf(pair, arch):
    """The same tensors (names, types, shapes, bytes) and the same metadata, key for key and type
    for type (tokenizer and pre-tokenizer included), apart from qtool's own three keys."""
    (t_ours, kv_ours), (t_theirs, kv_theirs) = (contents(p) for p in pair(arch))
    assert set(t_ours) == set(t_theirs)
    assert [n for n in t_ours if t_ours[n] != t_theirs[n]] == []
    assert set(kv_ours) - set(kv_theirs) == OUR_KEYS
    assert {k: v for k, v in kv_ours.items() if k not in OUR_KEYS} == kv_theirs


@pytest.mark.slow
@pytest.mark.parametrize("mixture", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss", "gemma3_text"])
def test_quantized_file_equals_llama_quantize(pair, with_tokenizer, tools, tmp_path, arch, mixture):
    """convert_hf_to_gguf + llama-quantize vs one qtool run: per-tensor types (MoE experts, shared
    experts, MLA projections, routers) and bytes."""
    theirs = tools.quantize_gguf(pair(arch)[1], tmp_path / "theirs.gguf", mixture)
    ours = convert(with_tokenizer(arch), tmp_path / "ours.gguf", mixture)
    (t_ours, _), (t_theirs, _) = contents(ours), contents(theirs)
    assert {n: t[0] for n, t in t_ours.items()} == {n: t[0] for n, t in t_theirs.items()}
    assert [n for n in t_ours if t_ours[n] != t_theirs[n]] == []


TEXTS = ["Hello world!", "  leading spaces, tabs\tand 12345 numbers", "def f(x):\n    return x ** 2  # code\n"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "granite"])
def test_tokenization_matches_hugging_face(binding, ours_bf16, with_tokenizer, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(with_tokenizer(arch))
    for text in TEXTS:
        assert lct.llama_tokenize(ours_bf16(arch), text, add_bos=False) == tok.encode(text, add_special_tokens=False), text


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma3_text", "deepseek_v3"])
def test_tokenizer_read_back_from_the_gguf(ours_bf16, with_tokenizer, tmp_path, arch):
    """What calibration from a GGUF tokenizes with: the tokenizer GGUFSource writes beside an export."""
    from transformers import AutoTokenizer

    GGUFSource(ours_bf16(arch)).write_aux_files(tmp_path)
    ours, ref = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(with_tokenizer(arch))
    # not TEXTS[2]: transformers' GGUF tokenizer conversion (what write_aux_files uses, for every
    # architecture) splits runs of spaces after a newline differently from SmolLM2's own
    # pre-tokenizer: a known limitation of the reader, not of these architectures
    for text in TEXTS[:2] + ["héllo wörld, naïve café — 日本語 🤖", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text


@pytest.mark.slow
def test_gemma3_sentencepiece_file_equals_convert_hf_to_gguf(tools, tmp_path):
    """Gemma 3's own tokenizer kind (tokenizer.model): SentencePiece vocabulary, no space prefix."""
    import shutil

    pytest.importorskip("sentencepiece")
    from test_gguf_writer import build_spm_llama

    spm = build_spm_llama(tmp_path / "spm")
    cfg = tiny_config("gemma3_text", **GEMMA3_DEFAULT)
    cfg.vocab_size = 400
    folder = save_random(cfg, tmp_path / "hf", 3)
    shutil.copy(spm / "tokenizer.model", folder / "tokenizer.model")
    (t_ours, kv_ours) = contents(convert(folder, tmp_path / "ours.gguf", "BF16"))
    (t_theirs, kv_theirs) = contents(tools.convert_hf(folder, tmp_path / "theirs.gguf", "bf16"))
    assert kv_ours["tokenizer.ggml.model"][1] == "llama"
    assert t_ours == t_theirs
    assert {k: v for k, v in kv_ours.items() if k not in OUR_KEYS} == kv_theirs
