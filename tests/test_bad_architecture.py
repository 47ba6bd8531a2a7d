"""Bad input about the architecture, through the real CLI process (see tests/test_bad_input.py for
the contract: exit code, one stderr line naming the culprit, no traceback, nothing written). All
of these are refused from config.json and the tensor headers, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_bad_input import assert_fails, assert_nothing_left, copy_model, qtool
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("bad_arch") / "llama")


def with_config(src: Path, dst: Path, **changes) -> Path:
    copy_model(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_model_type(llama, tmp_path):
    src = with_config(llama, tmp_path / "m", model_type="nonesuch_lm", architectures=["NonesuchForCausalLM"])
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 3, "nonesuch_lm", "unknown architecture")
    assert_nothing_left(out)


def test_custom_code_needs_trust_remote_code(llama, tmp_path):
    src = with_config(llama, tmp_path / "m", model_type="my_lm", architectures=["MyLMForCausalLM"],
                      auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"})
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 3, "my_lm", "--trust-remote-code")
    assert_nothing_left(out)


def test_custom_code_runs_with_trust_remote_code(llama, tmp_path):
    """With the flag, the checkpoint's own code builds the model (here: a llama subclass shipped
    beside the weights, as custom-code checkpoints ship theirs)."""
    src = with_config(llama, tmp_path / "m", model_type="my_lm", architectures=["MyLMForCausalLM"],
                      auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLMForCausalLM"})
    (src / "configuration_my.py").write_text(
        "from transformers import LlamaConfig\n\nclass MyConfig(LlamaConfig):\n    model_type = 'my_lm'\n")
    (src / "modeling_my.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_my import MyConfig\n\n"
        "class MyLMForCausalLM(LlamaForCausalLM):\n    config_class = MyConfig\n")
    out = tmp_path / "out"
    p = qtool("quantize", src, "-b", "4", "-g", "32", "--trust-remote-code", "-o", out, "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["layers"]) == 14  # 7 linears x 2 blocks, found in the custom model


def test_encoder_only(llama, tmp_path):
    src = with_config(llama, tmp_path / "m", model_type="bert", architectures=["BertModel"])
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 3, "BertModel", "no decoder-block structure")
    assert_nothing_left(out)


def _tensors(llama: Path) -> dict[str, torch.Tensor]:
    return load_file(llama / "model.safetensors")


@pytest.mark.parametrize("damage, code, words", [
    ("missing", 5, ["model.layers.1.mlp.up_proj.weight", "missing", "LlamaForCausalLM"]),
    ("extra", 5, ["model.layers.1.mlp.extra_proj.weight", "not part of"]),
    ("misshaped", 5, ["model.layers.0.self_attn.k_proj.weight", "[40, 96]", "[48, 96]"]),
])
def test_tensors_not_matching_the_architecture(damage, code, words, llama, tmp_path):
    tensors = _tensors(llama)
    if damage == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif damage == "extra":
        tensors["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(8, 96, dtype=torch.bfloat16)
    else:
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:40].clone()
    src = copy_model(llama, tmp_path / "m", tensors)
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-b", "4", "-o", out, cwd=tmp_path), code, *words)
    assert_nothing_left(out)


def test_vision_tower_into_a_format_that_cannot_hold_it(tmp_path):
    """GPTQ loaders convert the language model's decoder blocks only: a vision-tower target is refused."""
    src = build_tiny("gemma3", tmp_path / "gemma3")
    out = tmp_path / "out"
    p = qtool("quantize", src, "-f", "gptq", "-b", "4", "-g", "32", "--target", "*fc1", "-o", out, cwd=tmp_path)
    assert_fails(p, 3, "vision_tower.encoder.layers.0.mlp.fc1", "decoder blocks")
    assert_nothing_left(out)
