"""`qtool quantize --eval` and the model card written into every quantized folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

EVAL = ("--eval-windows", "2", "--eval-seq-len", "32")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_with_byte_tokenizer

    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("qe") / "tiny-llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory, wikitext_path) -> Path:
    p = tmp_path_factory.mktemp("data") / "wiki.txt"
    p.write_text(wikitext_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return p


def _cli(*args):
    from typer.testing import CliRunner

    from qtool.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_eval_figures_are_qtool_eval_and_go_into_the_card(tiny_llama, text, tmp_path):
    out = tmp_path / "w4"
    r = _cli("quantize", tiny_llama, "-b", "4", "-g", "16", "--eval", "--eval-dataset", text, *EVAL, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    e = rep["eval"]
    assert e["model"] == str(out) and e["windows"] == 2 and e["seq_len"] == 32 and e["part"] == "eval"
    # the same figures as running `qtool eval` on the finished folder afterwards
    r2 = _cli("eval", out, "--base", tiny_llama, "--dataset", text, "--windows", "2", "--seq-len", "32", "--json")
    ref = json.loads(r2.stdout)
    for k in ("perplexity", "base_perplexity", "kld_mean", "top1_agreement", "tokens_scored"):
        assert e[k] == pytest.approx(ref[k], rel=1e-6), k
    assert e["kld_mean"] > 0 and 0 < e["top1_agreement"] <= 1
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nbase_model: ") and "## Quality" in card
    assert f"{e['perplexity']:.4f}" in card and f"{e['kld_mean']:.6f}" in card
    recipe = json.loads(re.search(r"```json\n(.*?)\n```", card, re.S).group(1))
    assert recipe == rep["recipe"]


def test_card_without_eval_and_for_gptq(tiny_llama, text, tmp_path):
    out = tmp_path / "g"
    r = _cli("quantize", tiny_llama, "-m", "gptq", "-b", "4", "-g", "16", "--dataset", text, "--samples", "2",
             "--seq-len", "32", "--eval", *EVAL, "-f", "gptq", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["eval"]["dataset"] == str(text) and rep["eval"]["part"] == "eval"  # --dataset's held-out half
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "calibration" in card and "gptqmodel" in card and "## Quality" in card
    plain = tmp_path / "plain"
    assert _cli("quantize", tiny_llama, "-b", "8", "-o", plain).exit_code == 0
    card = (plain / "README.md").read_text(encoding="utf-8")
    assert "## Quality" not in card and "rtn" in card


def test_eval_flags_refused_before_any_work(tiny_llama, text, tmp_path):
    out = tmp_path / "x"
    for args, words in [
        (("--eval",), ["--eval-dataset"]),
        (("--eval", "--eval-dataset", tmp_path / "none.txt"), ["none.txt", "no such file"]),
        (("--eval-dataset", text), ["without --eval"]),
    ]:
        r = _cli("quantize", tiny_llama, "-b", "4", *args, "-o", out)
        assert r.exit_code == 2, r.output
        assert all(w in r.output for w in words), r.output
        assert not out.exists()
