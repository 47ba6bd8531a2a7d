"""The CLI surface: help with examples, --json, shared option names, defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMANDS = ["quantize", "export", "inspect", "eval", "formats"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(cli, command):
    r = cli(command, "--help")
    assert r.exit_code == 0
    assert "Example" in r.stdout and f"qtool {command}" in r.stdout


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_shared_options_are_spelled_the_same(cli, command):
    text = cli(command, "--help").stdout
    for flag in ("--out", "-o", "--format", "-f", "--json", "--overwrite", "--revision"):
        assert flag in text, f"{command} lacks {flag}"


def test_quantize_json_is_machine_readable(cli, tiny_llama, tmp_path):
    r = cli("quantize", tiny_llama, "-b", "4", "-g", "32", "-o", tmp_path / "q", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)  # nothing but JSON on stdout (progress is off with --json)
    assert d["recipe"]["group_size"] == 32 and d["format"] == "compressed-tensors"
    assert d["params_quantized"] == sum(layer["shape"][0] * layer["shape"][1] for layer in d["layers"])
    assert d["bpw_quantized"] == pytest.approx(4 + 16 / 32)  # int4 codes + one bf16 scale per 32
    assert all(layer["sqnr_db"] > 15 for layer in d["layers"])
    assert d["output_bytes"] > 0 and d["seconds"] > 0


def test_quantize_summary_names_size_bpw_and_sqnr(cli, tiny_llama, tmp_path):
    r = cli("quantize", tiny_llama, "-b", "8", "-o", tmp_path / "q")
    assert r.exit_code == 0
    for word in ("bits per weight", "SQNR", "size", "time", "q_proj"):
        assert word in r.stdout


def test_default_output_name_describes_the_recipe(cli, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("quantize", tiny_llama, "-b", "4", "-g", "32", "--asym", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "llama-rtn-int4-g32-asym" / "config.json").is_file()


def test_default_output_name_of_aqlm_names_its_scheme():
    """AQLM ignores --bits / --group-size: its folder is named by codebooks x bits (and a non-default in-group)."""
    from types import SimpleNamespace

    from qtool.cli.quantize import default_out

    recipe = lambda **p: SimpleNamespace(method="aqlm", method_params=p, qtype="int4", strategy="channel", symmetric=True)  # noqa: E731
    assert default_out("org/Model", recipe()) == Path("Model-aqlm-2x8")
    assert default_out("m/", recipe(codebooks=1, codebook_bits=16)) == Path("m-aqlm-1x16")
    assert default_out("m", recipe(in_group=16)) == Path("m-aqlm-2x8-g16")


def test_target_and_ignore_globs(cli, tiny_llama, tmp_path):
    r = cli("quantize", tiny_llama, "-b", "4", "-g", "32", "--ignore", "*mlp*", "-o", tmp_path / "a", "--json")
    names = [layer["name"] for layer in json.loads(r.stdout)["layers"]]
    assert names and all("self_attn" in n for n in names)
    r = cli("quantize", tiny_llama, "-b", "8", "--target", "lm_head", "-o", tmp_path / "b", "--json")
    assert [layer["name"] for layer in json.loads(r.stdout)["layers"]] == ["lm_head.weight"]
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in cfg["ignore"]


def test_formats_lists_registered_methods_and_formats(cli):
    d = json.loads(cli("formats", "--json").stdout)
    assert "rtn" in d["methods"] and "compressed-tensors" in d["formats"]


def test_python_dash_m_entry_point_works():
    r = subprocess.run([sys.executable, "-m", "qtool", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("qtool ")
