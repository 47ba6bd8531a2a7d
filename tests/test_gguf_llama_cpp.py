"""qtool's GGUF files in llama.cpp itself (the `llama_cpp` binding and `llama-quantize`, built
from the llama-cpp-python 0.3.36 sdist by tests/llama_cpp_tools.py; `make llama-cpp`).

* every architecture qtool writes loads, and its next-token logits match transformers';
* SmolLM2 in every float type and in quantized types: logits against transformers, tokenization
  against the Hugging Face tokenizer;
* per-tensor types (and bytes) against what llama-quantize makes from our own BF16 file.

Skipped, naming the missing piece, where the binding or the tools are not built.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import CACHE
from qtool.formats.gguf.writer import GGUFWriter
from qtool.model.resolve import open_source
from qtool.pipeline import run
from test_gguf_writer import build_spm_llama, build_tiny_mixtral
from tiny_models import build_tiny

lct = pytest.importorskip("llama_cpp_tools")
PROMPT = [1, 5, 9, 33, 77, 2, 100, 14, 200, 255, 3, 64]
TEXT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def binding():
    if os.environ.get("QTOOL_BUILD_LLAMA_CPP"):
        lct.ensure_binding(CACHE)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama_cpp binding not installed (make llama-cpp)")


@pytest.fixture(scope="module")
def tools():
    if os.environ.get("QTOOL_BUILD_LLAMA_CPP"):
        return lct.ensure_llama_cpp(CACHE)
    root = lct.key_dir(CACHE)
    t = lct._tools_at(root)
    if not t.quantize.is_file():
        pytest.skip(f"llama-quantize not built under {root} (make llama-cpp)")
    return t


def convert(folder: Path, out: Path, gguf_type: str) -> Path:
    with open_source(str(folder)) as src:
        run(str(folder), src, out, GGUFWriter(type=gguf_type), None, overwrite=True)
    return out


def hf_logits(folder: Path, ids: list[int], state: dict | None = None) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# -- architectures --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma2", "qwen2_moe", "mixtral"])
def test_tiny_architecture_logits_match_transformers(binding, tmp_path, arch):
    """F32 files: the same numbers in both runtimes, so only kernel rounding differs. Measured
    max |diff| 2e-4..1.3e-3 on logits of magnitude 0.7..4; 5e-3 leaves room for other CPUs."""
    folder = build_tiny_mixtral(tmp_path / "hf") if arch == "mixtral" else build_tiny(arch, tmp_path / "hf")
    got = lct.gguf_next_token_logits(convert(folder, tmp_path / "m.gguf", "F32"), PROMPT)
    ref = hf_logits(folder, PROMPT)
    np.testing.assert_allclose(got, ref, atol=5e-3, rtol=0)


# -- SmolLM2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir).encode(TEXT)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_dir, smollm2_ids):
    return hf_logits(smollm2_dir, smollm2_ids)


@pytest.fixture(scope="module")
def smollm2_files(smollm2_dir, tmp_path_factory):
    made: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("smollm2-gguf")

    def get(gguf_type: str) -> Path:
        if gguf_type not in made:
            made[gguf_type] = convert(smollm2_dir, folder / f"smollm2-{gguf_type}.gguf", gguf_type)
        return made[gguf_type]

    return get


# Tolerances, max |logit difference| against transformers in float32 (logits reach ~28 here):
# F32 is the same arithmetic up to summation order (measured 0.018); F16 adds one rounding of the
# weights, and llama.cpp's F16 matmul keeps activations in F16 (0.032); BF16 rounds activations
# to bf16 in its dot products (0.23).
FLOAT_TOL = {"F32": 0.05, "F16": 0.1, "BF16": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(FLOAT_TOL))
def test_smollm2_float_files_match_transformers(binding, smollm2_files, smollm2_ids, smollm2_ref, gguf_type):
    got = lct.gguf_next_token_logits(smollm2_files(gguf_type), smollm2_ids)
    assert np.abs(got - smollm2_ref).max() <= FLOAT_TOL[gguf_type]
    assert (got.argmax(-1) == smollm2_ref.argmax(-1)).all()


# Quantized files against transformers running the *same dequantized weights* (read back by
# qtool's GGUF reader): what remains is llama.cpp's runtime arithmetic, which quantizes the
# activations to 8 bits too (Q8_0 / Q8_K dot products): measured max |diff| 1.33 (Q8_0) and 1.42
# (Q4_K_M) on logits up to 28, against 1.73 and 6.8 from the unquantized model. The file's bytes
# themselves are checked exactly against llama-quantize below.
QUANT_TOL = {"Q8_0": 2.0, "Q4_K_M": 2.0}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(QUANT_TOL))
def test_smollm2_quantized_files_match_their_dequantized_weights(binding, smollm2_dir, smollm2_files, smollm2_ids, smollm2_ref, gguf_type):
    from qtool.model.gguf_source import GGUFSource

    path = smollm2_files(gguf_type)
    back = GGUFSource(path, dtype=torch.float32)
    state = {m.name: back.get_tensor(m.name) for m in back.tensors()}
    ref = hf_logits(smollm2_dir, smollm2_ids, state)
    got = lct.gguf_next_token_logits(path, smollm2_ids)
    assert np.abs(got - ref).max() <= QUANT_TOL[gguf_type]
    cos = (got * smollm2_ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(smollm2_ref, axis=-1)
    assert cos.min() >= (0.99 if gguf_type == "Q8_0" else 0.9)  # against the unquantized model


TOKENIZER_TEXTS = [
    "Hello world!",
    "  leading spaces, tabs\tand 12345 numbers",
    "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, 🦙🚀",
    "def f(x):\n    return x ** 2  # code\n\n",
]


@pytest.mark.slow
def test_smollm2_tokenization_matches_hugging_face(binding, smollm2_dir, smollm2_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    path = smollm2_files("BF16")
    for text in TOKENIZER_TEXTS:
        assert lct.llama_tokenize(path, text, add_bos=False) == tok.encode(text, add_special_tokens=False), text


def test_sentencepiece_tokenization_matches_sentencepiece(binding, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = build_spm_llama(tmp_path / "hf")
    path = convert(folder, tmp_path / "s.gguf", "F16")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ["the quick café", "  naïve über 日本 zzz Ω", "hello\nworld\t!", "llama"]:
        assert lct.llama_tokenize(path, text, add_bos=False) == sp.encode(text), text


# -- llama-quantize's own choices -------------------------------------------------------------------

MIXTURES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
            "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


def tensor_table(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def build_wide_llama(folder: Path) -> Path:
    """Untied, 8 layers, rows of 256 / 512: the K types apply without fallbacks, so every
    position rule of the mixtures shows."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   tie_word_embeddings=False, initializer_range=0.05)
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantize_inputs(smollm2_files, tmp_path_factory):
    """Our BF16 files (which llama-quantize has to load first): SmolLM2 (tied, 576-wide: fallbacks)
    and a wide tiny llama (untied, no fallbacks)."""
    folder = tmp_path_factory.mktemp("wide")
    wide = build_wide_llama(folder / "hf")
    return {"smollm2": (None, smollm2_files("BF16")), "wide": (wide, convert(wide, folder / "wide-BF16.gguf", "BF16"))}


@pytest.mark.slow
@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("model", ["wide", "smollm2"])
def test_types_and_bytes_match_llama_quantize(tools, quantize_inputs, smollm2_dir, tmp_path, model, mixture):
    folder, bf16 = quantize_inputs[model]
    theirs = tensor_table(tools.quantize_gguf(bf16, tmp_path / "theirs.gguf", mixture))
    ours = tensor_table(convert(folder or smollm2_dir, tmp_path / "ours.gguf", mixture))
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    differ = [n for n in ours if ours[n][1] != theirs[n][1]]
    assert differ == [], f"{len(differ)} of {len(ours)} tensors differ in bytes, e.g. {differ[:3]}"
    assert Counter(t for t, _ in ours.values())  # non-empty


# -- against llama.cpp's converter --------------------------------------------------------------------

OUR_KEYS = {"general.quantized_by", "qtool.type", "qtool.provenance"}


def gguf_contents(path: Path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, tuple(t.shape.tolist()), t.data.tobytes()) for t in r.tensors}
    kv = {f.name: ([x.name for x in f.types], f.contents()) for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return tensors, kv


def spm_variant(arch: str, folder: Path, spm_folder: Path) -> Path:
    """A tiny `arch` model with a 400-token vocabulary and the SentencePiece tokenizer.model."""
    import shutil

    from tiny_models import make_config, save_random

    cfg = make_config(arch)
    cfg.vocab_size = 400
    save_random(cfg, folder, 3)
    shutil.copy(spm_folder / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "llama-spm", "gemma2-spm", "phi3-spm"])
def test_bf16_file_equals_convert_hf_to_gguf(tools, smollm2_dir, smollm2_files, tmp_path, model):
    """Our BF16 file and llama.cpp's converter's (`--outtype bf16`) on the same folder: the same
    tensors (names, types, shapes, bytes) and the same metadata, key for key and type for type,
    apart from qtool's own three keys."""
    if model == "smollm2":
        folder, ours = smollm2_dir, smollm2_files("BF16")
    else:
        pytest.importorskip("sentencepiece")
        spm = build_spm_llama(tmp_path / "spm")
        arch = model.removesuffix("-spm")
        folder = spm if arch == "llama" else spm_variant(arch, tmp_path / "hf", spm)
        ours = convert(folder, tmp_path / "ours.gguf", "BF16")
    theirs = tools.convert_hf(folder, tmp_path / "theirs.gguf", "bf16")
    (t_ours, kv_ours), (t_theirs, kv_theirs) = gguf_contents(ours), gguf_contents(theirs)
    assert set(t_ours) == set(t_theirs)
    assert [n for n in t_ours if t_ours[n] != t_theirs[n]] == []
    assert set(kv_ours) - set(kv_theirs) == OUR_KEYS
    assert {k: v for k, v in kv_ours.items() if k not in OUR_KEYS} == kv_theirs
