"""The GGUF writer: round trips through qtool's own GGUF reader, llama.cpp's per-tensor type rules,
metadata and tokenizer fields, option checking, atomic and streaming output.

What llama.cpp itself makes of these files (loading, logits, tokenization, llama-quantize's own
choices) is tested in test_gguf_llama_cpp.py."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qtool.core.metrics import sqnr_db
from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.formats.gguf import mixtures as mx
from qtool.formats.gguf import tokenizer as tk
from qtool.formats.gguf.writer import GGUFWriter, permute_qk_rows
from qtool.model.gguf_source import GGUFSource, unpermute_qk_rows
from qtool.model.resolve import open_source
from qtool.pipeline import run
from tiny_models import build_tiny

T = gguf.GGMLQuantizationType
TT = gguf.TokenType
K_TYPES_AVAILABLE = True
try:  # the torch K-quant encoders (qtool/formats/gguf/quants.py) may not be there yet
    from qtool.formats.gguf import quants  # noqa: F401
except ImportError:
    K_TYPES_AVAILABLE = False
needs_k = pytest.mark.skipif(not K_TYPES_AVAILABLE, reason="qtool.formats.gguf.quants (K-quant encoders) not present")


def build_tiny_mixtral(folder: Path) -> Path:
    """Mixtral is not among tiny_models' architectures: 4 experts (top-2), same widths."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    from tiny_models import save_random

    return save_random(cfg, folder, 1234)


def build_spm_llama(folder: Path) -> Path:
    """A tiny llama with a SentencePiece tokenizer.model trained here (BPE with byte fallback,
    identity normalization and kept whitespace, as Llama 2 / Mistral / Gemma tokenizers are)."""
    import random
    import shutil

    import sentencepiece as spm
    import transformers

    random.seed(0)
    words = "the quick brown fox jumps over lazy dog llama gemma token model weight café naïve über 日本 語".split()
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text("\n".join(" ".join(random.choice(words) for _ in range(12)) for _ in range(2000)), encoding="utf-8")
    prefix = folder.parent / f"{folder.name}-sp"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    shutil.copy(f"{prefix}.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            builders = {"mixtral": build_tiny_mixtral, "spm": build_spm_llama}
            made[arch] = builders[arch](folder) if arch in builders else build_tiny(arch, folder)
        return made[arch]

    return get


def write(folder: Path, out: Path, gguf_type: str, recipe=None):
    writer = GGUFWriter(type=gguf_type)
    with open_source(str(folder)) as src:
        report = run(str(folder), src, out, writer, recipe, overwrite=True)
    return writer, report


def read_gguf(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """GGUF name -> (type name, float32 values in torch dimension order), with gguf-py alone."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape))
    return out


def fields(path: Path) -> dict[str, tuple[list[str], object]]:
    return {f.name: ([t.name for t in f.types], f.contents()) for f in gguf.GGUFReader(path).fields.values()}


# -- round trips -------------------------------------------------------------------------------------

# (type, SQNR floor in dB). Exact types are compared for equality instead. Floors: Gaussian weights
# give ~45 dB at Q8_0 and ~20 / ~26 dB at Q4_0 / Q5_0 (6 dB per bit, minus the absmax block scale's
# loss); the floors sit a few dB below to stay robust to the seed.
LOSSY = {"Q8_0": 40.0, "Q5_0": 23.0, "Q5_1": 23.0, "Q4_0": 17.0, "Q4_1": 17.0}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("gguf_type", ["F32", "BF16", "F16", "Q8_0", "Q4_0", "Q5_1"])
def test_round_trip_through_gguf_source(tiny, tmp_path, arch, gguf_type):
    folder = tiny(arch)
    out = tmp_path / "m.gguf"
    write(folder, out, gguf_type)
    back = GGUFSource(out, dtype=torch.float32)
    with open_source(str(folder)) as src:
        assert {m.name for m in back.tensors()} == {m.name for m in src.tensors()}
        for m in src.tensors():
            ref, got = src.get_tensor(m.name).float(), back.get_tensor(m.name)
            if m.name.endswith("norm.weight") or m.name.endswith(".bias") or gguf_type in ("F32", "BF16"):
                assert torch.equal(got, ref), m.name  # F32 in the file, or bf16 -> BF16: exact
            elif gguf_type == "F16":
                assert torch.equal(got, ref.half().float()), m.name  # one round-to-nearest-even
            else:
                assert sqnr_db(ref, got) >= LOSSY[gguf_type], (m.name, sqnr_db(ref, got))


def test_moe_experts_are_stacked_and_routers_kept(tiny, tmp_path):
    """Mixtral (llama arch, Q/K permuted) and qwen2_moe: per-expert matrices become one
    [n_expert, rows, cols] tensor per projection; routers stay F32; qwen2_moe's 1-row shared
    expert gate is [hidden, 1] in GGML order."""
    for arch, projs in (("mixtral", {"w1": "gate", "w2": "down", "w3": "up"}),
                        ("qwen2_moe", {"gate_proj": "gate", "down_proj": "down", "up_proj": "up"})):
        out = tmp_path / f"{arch}.gguf"
        writer, report = write(tiny(arch), out, "F32")
        got = read_gguf(out)
        moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
        with open_source(str(tiny(arch))) as src:
            for layer in range(2):
                for hf, short in projs.items():
                    stacked = torch.stack([src.get_tensor(f"model.layers.{layer}.{moe}.experts.{e}.{hf}.weight").float() for e in range(4)])
                    assert torch.equal(got[f"blk.{layer}.ffn_{short}_exps.weight"][1], stacked)
                assert got[f"blk.{layer}.ffn_gate_inp.weight"][0] == "F32"
                q = src.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight").float()
                expect_q = permute_qk_rows(q, 4) if arch == "mixtral" else q
                assert torch.equal(got[f"blk.{layer}.attn_q.weight"][1], expect_q)
            if arch == "qwen2_moe":
                assert got["blk.0.ffn_gate_inp_shexp.weight"][1].shape == (1, 96)
        # one outcome per expert matrix; buffering never exceeds one block's experts
        assert len([r for r in report.layers if ".experts." in r.name]) == 2 * 4 * 3
        assert 0 < writer.peak_buffered_bytes <= 3 * 4 * 96 * 64 * 4


def test_gemma2_norms_get_plus_one_and_no_output_tensor(tiny, tmp_path):
    out = tmp_path / "g.gguf"
    write(tiny("gemma2"), out, "F32")
    got = read_gguf(out)
    assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    with open_source(str(tiny("gemma2"))) as src:
        w = src.get_tensor("model.layers.0.pre_feedforward_layernorm.weight").float()
        assert torch.equal(got["blk.0.ffn_norm.weight"][1], w + 1)
        assert torch.equal(got["output_norm.weight"][1], src.get_tensor("model.norm.weight").float() + 1)
    f = fields(out)
    assert f["gemma2.attn_logit_softcapping"] == (["FLOAT32"], 50.0)
    assert f["gemma2.final_logit_softcapping"] == (["FLOAT32"], 30.0)
    assert f["gemma2.attention.sliding_window"] == (["UINT32"], 64)


def test_permutation_is_the_inverse_of_the_readers():
    t = torch.randn(4 * 2 * 3, 5)
    assert torch.equal(unpermute_qk_rows(permute_qk_rows(t, 4), 4), t)
    assert not torch.equal(permute_qk_rows(t, 4), t)


def test_outcomes_report_type_bits_and_sqnr(tiny, tmp_path):
    _, report = write(tiny("llama"), tmp_path / "m.gguf", "Q8_0")
    kinds = Counter(r.strategy for r in report.layers)
    assert kinds == {"Q8_0": 2 * 7 + 2}  # the block matrices, embeddings and lm_head
    assert report.bpw_quantized == pytest.approx(8.5)  # 34 bytes per 32 weights
    assert all(40 <= r.sqnr_db < 60 for r in report.layers)


# -- llama.cpp's type choices --------------------------------------------------------------------


def synthetic(n_layer=32, hidden=4096, ff=14336, tied=False):
    """GGUF name -> GGML shape for a llama-shaped model with no row-length fallbacks."""
    t = {"token_embd.weight": (hidden, 32000), "output_norm.weight": (hidden,)}
    if not tied:
        t["output.weight"] = (hidden, 32000)
    for i in range(n_layer):
        for name, ne in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, 1024)), ("attn_v", (hidden, 1024)),
                         ("attn_output", (hidden, hidden)), ("ffn_gate", (hidden, ff)), ("ffn_up", (hidden, ff)),
                         ("ffn_down", (ff, hidden)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            t[f"blk.{i}.{name}.weight"] = ne
    return t


def plan(mixture: str, facts: mx.ModelFacts, tensors: dict) -> dict[str, str]:
    conv = {n: (T.F32 if len(ne) == 1 else T.BF16) for n, ne in tensors.items()}
    return {n: c.qtype.name for n, c in mx.plan_types(tensors, mx.resolve(mixture), facts, conv).items()}


def test_q4_k_m_rules_on_a_wide_model():
    got = plan("Q4_K_M", mx.ModelFacts(32, 32, 8), synthetic())
    more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # use_more_bits(i, 32)
    assert {i for i in range(32) if got[f"blk.{i}.attn_v.weight"] == "Q6_K"} == more_bits
    assert {i for i in range(32) if got[f"blk.{i}.ffn_down.weight"] == "Q6_K"} == more_bits
    assert got["output.weight"] == "Q6_K" and got["token_embd.weight"] == "Q4_K"
    assert got["blk.5.attn_q.weight"] == got["blk.5.ffn_up.weight"] == "Q4_K"
    assert got["blk.5.attn_norm.weight"] == "F32"
    tied = plan("Q4_K_M", mx.ModelFacts(32, 32, 8), synthetic(tied=True))
    assert tied["token_embd.weight"] == "Q6_K"  # stands in for the output matrix


@pytest.mark.parametrize("mixture, expect", [
    # (tensor, type) pairs straight from llama_tensor_get_type_impl's branches
    ("Q3_K_M", {"blk.0.attn_v.weight": "Q5_K", "blk.2.attn_v.weight": "Q4_K", "blk.1.ffn_down.weight": "Q5_K",
                "blk.2.ffn_down.weight": "Q4_K", "blk.0.attn_output.weight": "Q4_K", "blk.0.attn_q.weight": "Q3_K"}),
    ("Q3_K_L", {"blk.9.attn_v.weight": "Q5_K", "blk.9.ffn_down.weight": "Q5_K", "blk.9.attn_output.weight": "Q5_K"}),
    ("Q4_K_S", {"blk.3.attn_v.weight": "Q5_K", "blk.4.attn_v.weight": "Q4_K", "blk.3.ffn_down.weight": "Q5_K",
                "blk.4.ffn_down.weight": "Q4_K"}),
    ("Q2_K", {"blk.9.attn_v.weight": "Q4_K", "blk.9.ffn_down.weight": "Q3_K", "blk.9.attn_output.weight": "Q3_K",
              "blk.9.attn_q.weight": "Q2_K", "output.weight": "Q6_K"}),
    ("Q5_K_S", {"blk.0.attn_v.weight": "Q5_K", "blk.0.ffn_down.weight": "Q5_K"}),
    ("Q6_K", {"blk.0.attn_v.weight": "Q6_K", "output.weight": "Q6_K"}),
    ("Q8_0", {"output.weight": "Q8_0", "token_embd.weight": "Q8_0"}),
    ("Q4_0", {"output.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_0"}),
    ("F16", {"output.weight": "F16", "blk.0.attn_norm.weight": "F32"}),
])
def test_mixture_rules(mixture, expect):
    got = plan(mixture, mx.ModelFacts(32, 32, 8), synthetic())
    assert {k: got[k] for k in expect} == expect


def test_eight_expert_and_70b_rules():
    moe = plan("Q4_K_M", mx.ModelFacts(32, 32, 8, n_expert=8), synthetic())
    assert moe["blk.4.attn_v.weight"] == moe["blk.4.attn_k.weight"] == "Q8_0"
    assert moe["blk.4.attn_output.weight"] == "Q5_K"
    big = plan("Q3_K_S", mx.ModelFacts(80, 64, 8, is_70b=True), synthetic(n_layer=80, hidden=8192, ff=28672))
    assert big["blk.40.attn_v.weight"] == "Q5_K" and big["blk.40.attn_q.weight"] == "Q3_K"


def test_fallbacks_for_rows_that_are_no_multiple_of_256():
    assert mx._fallback(T.Q4_K, 576) == mx.TypeChoice(T.Q5_0, "576 columns not a multiple of 256: Q4_K -> Q5_0")
    assert [mx._fallback(t, 576).qtype for t in (T.Q2_K, T.Q3_K, T.Q5_K, T.Q6_K)] == [T.Q4_0, T.Q4_0, T.Q5_1, T.Q8_0]
    assert mx._fallback(T.Q4_K, 100).qtype == T.F16  # not even a multiple of 32
    assert mx._fallback(T.Q8_0, 96).qtype == T.Q8_0


@pytest.mark.slow
def test_smollm2_q4_k_m_is_mostly_q5_0(smollm2_dir):
    """llama-quantize's Q4_K_M on SmolLM2 (hidden 576): 166 of 211 matrices fall back to Q5_0."""
    with open_source(str(smollm2_dir)) as src:
        entries = GGUFWriter(type="Q4_K_M").plan(src)
    mats = {e.name: e.qtype.name for e in entries if len(e.shape) == 2}
    assert Counter(mats.values()) == {"Q5_0": 166, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert mats["token_embd.weight"] == "Q8_0"  # tied: the output rule, 576 % 256 -> Q8_0
    assert mats["blk.0.attn_v.weight"] == "Q8_0" and mats["blk.3.attn_v.weight"] == "Q5_0"
    assert mats["blk.0.ffn_down.weight"] == "Q6_K" and mats["blk.3.ffn_down.weight"] == "Q4_K"


@pytest.mark.slow
def test_smollm2_q4_1_types_match_the_released_llama_cpp_file(smollm2_dir):
    """The wheel's SmolLM2 GGUF was made by llama-quantize Q4_1: our plan gives every tensor the
    type it has there (token_embd: Q4_1 -> Q6_K by the output rule -> Q8_0 by the fallback)."""
    from qtool.model.smollm2 import ensure_smollm2_gguf
    from conftest import CACHE

    released = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ensure_smollm2_gguf(CACHE)).tensors}
    with open_source(str(smollm2_dir)) as src:
        ours = {e.name: e.qtype.name for e in GGUFWriter(type="Q4_1").plan(src)}
    assert ours == released


# -- metadata and tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2-bf16.gguf"
    with open_source(str(smollm2_dir)) as src:
        run(str(smollm2_dir), src, out, GGUFWriter(), None)  # no --type on export: BF16 ("auto")
    return out


@pytest.mark.slow
def test_smollm2_metadata_keys_and_types(smollm2_bf16):
    f = fields(smollm2_bf16)
    expect = {
        "general.architecture": (["STRING"], "llama"),
        "general.file_type": (["UINT32"], int(gguf.LlamaFileType.MOSTLY_BF16)),
        "general.quantization_version": (["UINT32"], gguf.GGML_QUANT_VERSION),
        "llama.block_count": (["UINT32"], 30),
        "llama.context_length": (["UINT32"], 8192),
        "llama.embedding_length": (["UINT32"], 576),
        "llama.feed_forward_length": (["UINT32"], 1536),
        "llama.attention.head_count": (["UINT32"], 9),
        "llama.attention.head_count_kv": (["UINT32"], 3),
        "llama.rope.freq_base": (["FLOAT32"], 100000.0),
        "llama.rope.dimension_count": (["UINT32"], 64),
        "llama.vocab_size": (["UINT32"], 49152),
        "qtool.type": (["STRING"], "BF16"),
    }
    assert {k: f[k] for k in expect} == expect
    assert f["llama.attention.layer_norm_rms_epsilon"][0] == ["FLOAT32"]
    record = json.loads(f["qtool.provenance"][1])
    assert record["gguf_type"] == "BF16" and "model.safetensors" in record["inputs"]
    assert all(t.tensor_type.name in ("BF16", "F32") for t in gguf.GGUFReader(smollm2_bf16).tensors)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_the_released_llama_cpp_file(smollm2_bf16):
    """The released GGUF's vocabulary was written by llama.cpp's converter from the original
    tokenizer; ours, from the folder qtool rebuilt, must be the same field for field."""
    from qtool.model.smollm2 import ensure_smollm2_gguf
    from conftest import CACHE

    ours, theirs = fields(smollm2_bf16), fields(ensure_smollm2_gguf(CACHE))
    keys = [k for k in theirs if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    assert len(keys) >= 11
    for k in keys:
        assert ours[k] == theirs[k], k
    assert ours["tokenizer.ggml.pre"] == (["STRING"], "smollm")


@pytest.mark.slow
def test_smollm2_bf16_round_trip_is_exact(smollm2_bf16, smollm2_dir):
    got = read_gguf(smollm2_bf16)
    with open_source(str(smollm2_dir)) as src:
        for hf, name, heads in (("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight", 3),
                                ("model.layers.7.mlp.down_proj.weight", "blk.7.ffn_down.weight", 0),
                                ("model.embed_tokens.weight", "token_embd.weight", 0)):
            ref = src.get_tensor(hf).float()
            assert torch.equal(got[name][1], permute_qk_rows(ref, heads) if heads else ref), name


@pytest.mark.slow
def test_gguf_source_keeps_its_tokenizer_and_model_description(tmp_path):
    """Re-quantizing a GGUF (here the released Q4_1) keeps its tokenizer.* and descriptive
    general.* keys verbatim, as llama-quantize does."""
    from qtool.model.smollm2 import ensure_smollm2_gguf
    from conftest import CACHE

    released = ensure_smollm2_gguf(CACHE)
    out = tmp_path / "q8.gguf"
    with GGUFSource(released) as src:
        run(str(released), src, out, GGUFWriter(type="Q8_0"), None)
    ours, theirs = fields(out), fields(released)
    same = [k for k in theirs if k.startswith("tokenizer.") or k in ("general.name", "general.license", "general.languages")]
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    assert ours["general.file_type"][1] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_unknown_pre_tokenizer_is_refused(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {**spec["pre_tokenizer"], "add_prefix_space": True}  # a different regex stage
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text((smollm2_dir / "tokenizer_config.json").read_text())
    assert tk.pre_tokenizer_name(AutoTokenizer.from_pretrained(smollm2_dir), "x") == "smollm"
    with pytest.raises(UnsupportedError, match="unknown BPE pre-tokenizer .*check hash [0-9a-f]{64}"):
        tk.pre_tokenizer_name(AutoTokenizer.from_pretrained(tmp_path), str(tmp_path))


def test_sentencepiece_vocab(tiny, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tiny("spm")
    out = tmp_path / "s.gguf"
    write(folder, out, "Q8_0")
    f = fields(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert f["tokenizer.ggml.model"][1] == "llama" and f["tokenizer.ggml.pre"][1] == "default"
    assert f["tokenizer.ggml.tokens"][1] == [sp.id_to_piece(i) for i in range(400)]
    assert f["tokenizer.ggml.scores"] == (["ARRAY", "FLOAT32"], [sp.get_score(i) for i in range(400)])
    types = f["tokenizer.ggml.token_type"][1]
    assert types[:4] == [TT.UNKNOWN, TT.CONTROL, TT.CONTROL, TT.BYTE] and types[300] == TT.NORMAL
    assert f["tokenizer.ggml.bos_token_id"][1] == 1 and f["tokenizer.ggml.eos_token_id"][1] == 2


def test_folder_without_tokenizer_gets_no_vocab(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    write(tiny("qwen2"), out, "Q8_0")
    f = fields(out)
    assert f["tokenizer.ggml.model"] == (["STRING"], "none")
    assert f["qwen2.vocab_size"] == (["UINT32"], 256)
    assert f["general.file_type"] == (["UINT32"], int(gguf.LlamaFileType.MOSTLY_Q8_0))


# -- options, atomicity, streaming --------------------------------------------------------------------


def test_bad_type_names_the_valid_ones():
    with pytest.raises(UsageError, match=r"--type 'Q4_K_X'.*Q8_0.*Q4_K_M"):
        GGUFWriter(type="Q4_K_X")
    assert GGUFWriter(type="q4_k").requested.name == "Q4_K_M"  # llama-quantize's alias
    with pytest.raises(UsageError, match="contradicts"):
        GGUFWriter(type="Q8_0", dtype=torch.float16)
    assert GGUFWriter(dtype=torch.float16).requested.name == "F16"


def test_cli_bad_type_exits_2_before_loading(cli, tmp_path):
    r = cli("quantize", tmp_path / "does-not-exist", "-f", "gguf", "-t", "Q7_K", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 2 and "Q4_K_M" in r.output


def test_recipes_gguf_cannot_honour_are_refused():
    from qtool.config import make_recipe

    w = GGUFWriter()
    def recipe(**kw):
        args = dict(method="rtn", bits=None, qtype=None, group_size=None, asym=False, fmt="gguf")
        return make_recipe(**{**args, **kw})
    w.check_recipe(recipe(bits=8))
    w.check_recipe(recipe(method="gptq"))  # GPTQ on each tensor's GGUF grid: tests/test_gptq_gguf.py
    with pytest.raises(UsageError, match="--act-order needs --static-groups"):
        w.check_recipe(recipe(method="gptq", method_params={"act_order": True}))
    with pytest.raises(UsageError, match="--group-size"):
        w.check_recipe(recipe(group_size="64"))


def test_quantize_without_type_follows_bits(tiny, tmp_path, cli):
    out = tmp_path / "m.gguf"
    r = cli("quantize", tiny("llama"), "-f", "gguf", "-b", "8", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert fields(out)["qtool.type"][1] == "Q8_0"


def test_failure_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    import qtool.formats.gguf.writer as wmod

    calls = {"n": 0}
    real = wmod.encode

    def failing(x, qtype, *rest):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("disk on fire")
        return real(x, qtype, *rest)

    monkeypatch.setattr(wmod, "encode", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write(tiny("llama"), out, "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_dense_model_streams_without_buffering(tiny, tmp_path):
    writer, _ = write(tiny("llama"), tmp_path / "m.gguf", "Q4_0")
    assert writer.peak_buffered_bytes == 0  # every tensor written the moment it arrived


def test_unexpected_tensor_is_an_error(tiny, tmp_path):
    writer = GGUFWriter(type="F32")
    with open_source(str(tiny("llama"))) as src:
        writer.begin(tmp_path / "m.gguf", src, None)
        with pytest.raises(FormatError, match="not in the plan"):
            writer.add_tensor("model.layers.9.mlp.extra.weight", torch.zeros(2, 2))
        writer.abort()


@needs_k
@pytest.mark.parametrize("gguf_type, floor", [("Q4_K_M", 20.0), ("Q6_K", 28.0), ("Q3_K_M", 14.0), ("Q2_K", 8.0)])
def test_k_mixtures_round_trip(tiny, tmp_path, gguf_type, floor):
    folder = tiny("llama")
    out = tmp_path / "m.gguf"
    _, report = write(folder, out, gguf_type)
    back = GGUFSource(out, dtype=torch.float32)
    with open_source(str(folder)) as src:
        worst = min(sqnr_db(src.get_tensor(m.name).float(), back.get_tensor(m.name)) for m in src.tensors())
    assert worst >= floor
    assert all(math.isfinite(r.sqnr_db) for r in report.layers)


def test_bulk_array_packing_is_gguf_pys_bytes():
    """The writer packs the vocabulary's arrays in bulk; the bytes are gguf-py's, item by item."""
    from qtool.formats.gguf.writer import _KVWriter

    VT = gguf.GGUFValueType
    ours, theirs = _KVWriter(path=None, arch="llama"), gguf.GGUFWriter(path=None, arch="llama")
    rng = np.random.default_rng(0)
    cases = [
        (["a", "ĠHello", "<|im_end|>", "日本", "", "\n"], None),
        ([b"\xe2\x96\x81x", b"y", b""], None),
        ([int(x) for x in rng.integers(0, 6, 1000)], VT.INT32),
        ([TT.NORMAL, TT.CONTROL, TT.USER_DEFINED], None),
        ([float(x) for x in rng.normal(size=300)] + [-1000.0, -10000.0, 1e-45], VT.FLOAT32),
        ([1, 2, 3], VT.UINT32),
        ([1.5, 2.25], None),
        ([True, False], None),  # bools: gguf-py's own path
        ([1, 2**40], VT.UINT64),
    ]
    for val, sub in cases:
        for add in (True, False):
            assert ours._pack_val(val, VT.ARRAY, add, sub) == theirs._pack_val(val, VT.ARRAY, add, sub), (val[:3], sub)
    import struct

    with pytest.raises(struct.error):  # out of range: gguf-py's own error, as before
        ours._pack_val([1, -1], VT.ARRAY, True, VT.UINT32)


def test_plain_tokenizer_reads_what_autotokenizer_reads(smollm2_dir, tmp_path, monkeypatch):
    """bpe_vocab without transformers (tokenizers only) gives AutoTokenizer's tokens, types and
    pre-tokenizer; a tokenizer_config that transformers acts on sends it back to AutoTokenizer."""
    assert tk._PlainTokenizer.open(smollm2_dir) is not None
    fast = tk.bpe_vocab(smollm2_dir, 49152)
    monkeypatch.setattr(tk._PlainTokenizer, "open", classmethod(lambda cls, folder: None))
    assert fast == tk.bpe_vocab(smollm2_dir, 49152)
    monkeypatch.undo()
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((smollm2_dir / "tokenizer.json").read_text())
    for change in ({"add_bos_token": True}, {"tokenizer_class": "Qwen2Tokenizer"},
                   {"added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": False, "normalized": False}}}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **change}))
        assert tk._PlainTokenizer.open(tmp_path) is None, change


def test_special_vocab_merges_are_gguf_pys(smollm2_dir, tmp_path):
    """The bulk merges of tk.SpecialVocab equal gguf-py's, spaces inside a merge part included."""
    ours, theirs = tk.SpecialVocab(smollm2_dir, load_merges=True), gguf.SpecialVocab(smollm2_dir, load_merges=True)
    assert len(ours.merges) > 40000 and ours.merges == theirs.merges
    assert (ours.special_token_ids, ours.add_special_token, ours.chat_template) == \
        (theirs.special_token_ids, theirs.add_special_token, theirs.chat_template)
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = [["a b", "c"], ["Ġx", " "], *spec["model"]["merges"][:10]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert tk.SpecialVocab(tmp_path, load_merges=True).merges == gguf.SpecialVocab(tmp_path, load_merges=True).merges
