"""Quantize once, write many (`-f gptq,awq,compressed-tensors[,gguf]`): one method run feeds every
writer; each format lands in its own folder under -o with its model card, holding exactly the
tensors a separate single-format run writes."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

SHARED = ["gptq", "compressed-tensors", "awq"]


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _qconfig(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_format_equals_its_single_run(method, tiny_byte_llama, wiki_sample, tmp_path, cli):
    calib = ["-m", "gptq", "--dataset", wiki_sample, "--samples", "4", "--seq-len", "64"] if method == "gptq" else []
    args = [tiny_byte_llama, "-b", "4", "-g", "32", "--asym", *calib]
    r = cli("quantize", *args, "-f", ",".join(SHARED), "-o", tmp_path / "all", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["formats"] == [",".join(SHARED)] and len(rep["outputs"]) == 1  # one run of the method for all three
    for fmt in SHARED:
        one = tmp_path / f"one-{fmt}"
        r1 = cli("quantize", *args, "-f", fmt, "-o", one, "-q")
        assert r1.exit_code == 0, r1.output
        got, ref = _tensors(tmp_path / "all" / fmt), _tensors(one)
        assert got.keys() == ref.keys(), fmt
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].equal(ref[k]), (fmt, k)
        assert _qconfig(tmp_path / "all" / fmt) == _qconfig(one)
        card = (tmp_path / "all" / fmt / "README.md").read_text()
        assert f"| format | {fmt} |" in card
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(SHARED)


def test_gguf_in_the_list_is_its_own_file(tmp_path, cli, smollm2_dir):
    from tiny_models import build_tiny_with_tokenizer_of

    src = build_tiny_with_tokenizer_of(tmp_path / "src", smollm2_dir)
    r = cli("quantize", src, "-b", "8", "-f", "compressed-tensors,gguf", "-t", "Q8_0", "-o", tmp_path / "all", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["formats"] == ["compressed-tensors", "gguf"]
    gguf_file = tmp_path / "all" / "all-Q8_0.gguf"
    r1 = cli("quantize", src, "-b", "8", "-f", "gguf", "-t", "Q8_0", "-o", tmp_path / "one.gguf", "-q")
    assert r1.exit_code == 0, r1.output
    import gguf

    a, b = gguf.GGUFReader(str(gguf_file)), gguf.GGUFReader(str(tmp_path / "one.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and bytes(x.data) == bytes(y.data), x.name
    assert (tmp_path / "all" / "compressed-tensors" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "fmt, extra, needle",
    [
        ("gptq,gptq", [], "listed twice"),
        ("gptq,nope", [], "nope"),
        ("gptq,awq", ["-t", "Q4_K_M"], "--type: not an option"),
        ("gptq,awq", ["--eval", "--eval-dataset", "x.txt"], "--eval with --format"),
    ],
    ids=["duplicate", "unknown", "gguf-type-without-gguf", "eval"],
)
def test_bad_format_lists_are_refused_before_reading(fmt, extra, needle, tmp_path, cli):
    r = cli("quantize", tmp_path / "never-read", "-b", "4", "-g", "32", "-f", fmt, *extra, "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert needle in r.output and not (tmp_path / "o").exists()
