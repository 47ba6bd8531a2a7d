"""`qtool quantize org/name` downloads through huggingface_hub's real code path, here from a local
fake Hub (tests/hub_server.py): only weights, config and tokenizer files; never pickles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hub_server import fake_hub, hub_env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    folder = tmp_path_factory.mktemp("repo") / "tiny"
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not needed: the safetensors are there")
    (folder / "README.md").write_text("model card")
    return folder


def test_quantize_from_hub_id_downloads_only_what_it_needs(tiny_repo, tmp_path, monkeypatch, cli):
    with fake_hub({"org/tiny": tiny_repo}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        r = cli("quantize", "org/tiny", "-b", "4", "-g", "32", "-o", tmp_path / "q", "--json")
        assert r.exit_code == 0, r.output
        got = hub.files_downloaded("org/tiny")
    assert got == {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"}
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()
    assert json.loads(r.stdout)["params_quantized"] > 0


def test_quantize_from_hub_in_a_subprocess_with_revision(tiny_repo, tmp_path, monkeypatch):
    with fake_hub({"org/tiny": tiny_repo}) as hub:
        env = hub_env(hub, tmp_path / "hf", monkeypatch)
        r = subprocess.run(
            [sys.executable, "-m", "qtool", "quantize", "org/tiny", "--revision", "main", "-b", "8", "-o", str(tmp_path / "q"), "-q"],
            capture_output=True, text=True, env=env,
        )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_unknown_hub_repo_is_a_one_line_error(tmp_path, monkeypatch, tiny_repo):
    with fake_hub({"org/tiny": tiny_repo}) as hub:
        env = hub_env(hub, tmp_path / "hf", monkeypatch)
        r = subprocess.run([sys.executable, "-m", "qtool", "quantize", "org/missing", "-o", str(tmp_path / "q")],
                           capture_output=True, text=True, env=env)
    assert r.returncode == 5
    assert "org/missing" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_pickle_only_repo_needs_allow_pickle(tmp_path, monkeypatch, cli):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    repo = tmp_path / "pkl"
    model = AutoModelForCausalLM.from_config(cfg)
    repo.mkdir()
    model.config.save_pretrained(repo)
    torch.save(model.state_dict(), repo / "pytorch_model.bin")
    with fake_hub({"org/pkl": repo}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        refused = cli("quantize", "org/pkl", "-b", "8", "-o", tmp_path / "a")
        assert refused.exit_code == 5 and "--allow-pickle" in refused.output
        assert "pytorch_model.bin" not in hub.files_downloaded("org/pkl")
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)
        ok = cli("quantize", "org/pkl", "-b", "8", "--allow-pickle", "-o", tmp_path / "b", "-q")
    assert ok.exit_code == 0, ok.output
