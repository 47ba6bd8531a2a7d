"""`qtool quantize --eval` and the model card written into every quantized folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import invoke_cli

EVAL = ("--eval-windows", "2", "--eval-seq-len", "32")


def test_eval_figures_are_qtool_eval_and_go_into_the_card(tiny_byte_llama, wiki_sample, tmp_path):
    out = tmp_path / "w4"
    r = invoke_cli("quantize", tiny_byte_llama, "-b", "4", "-g", "16", "--eval", "--eval-dataset", wiki_sample, *EVAL, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    e = rep["eval"]
    assert e["model"] == str(out) and e["windows"] == 2 and e["seq_len"] == 32 and e["part"] == "eval"
    # the same figures as running `qtool eval` on the finished folder afterwards
    r2 = invoke_cli("eval", out, "--base", tiny_byte_llama, "--dataset", wiki_sample, "--windows", "2", "--seq-len", "32", "--json")
    ref = json.loads(r2.stdout)
    for k in ("perplexity", "base_perplexity", "kld_mean", "top1_agreement", "tokens_scored"):
        assert e[k] == pytest.approx(ref[k], rel=1e-6), k
    assert e["kld_mean"] > 0 and 0 < e["top1_agreement"] <= 1
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "## Quality" in card
    assert "base_model:" not in card.split("---")[1] and str(tiny_byte_llama) in card  # a local path is no Hub model id
    assert f"{e['perplexity']:.4f}" in card and f"{e['kld_mean']:.6f}" in card
    recipe = json.loads(re.search(r"```json\n(.*?)\n```", card, re.S).group(1))
    assert recipe == rep["recipe"]


def test_card_without_eval_and_for_gptq(tiny_byte_llama, wiki_sample, tmp_path):
    out = tmp_path / "g"
    r = invoke_cli("quantize", tiny_byte_llama, "-m", "gptq", "-b", "4", "-g", "16", "--dataset", wiki_sample, "--samples", "2",
             "--seq-len", "32", "--eval", *EVAL, "-f", "gptq", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["eval"]["dataset"] == str(wiki_sample) and rep["eval"]["part"] == "eval"  # --dataset's held-out half
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "calibration" in card and "gptqmodel" in card and "## Quality" in card
    plain = tmp_path / "plain"
    assert invoke_cli("quantize", tiny_byte_llama, "-b", "8", "-o", plain).exit_code == 0
    card = (plain / "README.md").read_text(encoding="utf-8")
    assert "## Quality" not in card and "rtn" in card


def test_eval_flags_refused_before_any_work(tiny_byte_llama, wiki_sample, tmp_path):
    out = tmp_path / "x"
    for args, words in [
        (("--eval",), ["--eval-dataset"]),
        (("--eval", "--eval-dataset", tmp_path / "none.txt"), ["none.txt", "no such file"]),
        (("--eval-dataset", wiki_sample), ["without --eval"]),
    ]:
        r = invoke_cli("quantize", tiny_byte_llama, "-b", "4", *args, "-o", out)
        assert r.exit_code == 2, r.output
        assert all(w in r.output for w in words), r.output
        assert not out.exists()
