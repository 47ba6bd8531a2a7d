"""qtool/model/header_check.py: the tensor check from config + headers (no meta model) for plain
decoders, held equal to transformers' meta model; and a GGUF run refuses bad tensors through it
from headers, without importing transformers' modeling code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qtool.errors import FormatError
from qtool.model.header_check import BUFFERS, check_from_headers, expected_tensors
from qtool.model.structure import discover

REPO = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

VARIANTS = [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    ("llama", dict(num_key_value_heads=1, attention_bias=False, num_hidden_layers=3)),
    ("mistral", dict(num_key_value_heads=2, head_dim=24)),
    ("mistral", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=2)),
    ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    ("qwen3", dict(num_key_value_heads=4)),
    ("qwen3", dict(head_dim=24, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)),
]


@pytest.mark.parametrize("model_type,extra", VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)])
def test_rules_equal_transformers_meta_model(model_type, extra):
    cfg = {"model_type": model_type, **BASE, **extra}
    found = expected_tensors(cfg)
    assert found is not None
    cls, expected, tied = found
    s = discover(cfg, where="config.json")
    assert cls == s.family.class_name
    assert expected == {k: tuple(v) for k, v in s.expected.items()}
    assert tied == s.tied
    assert {n.rsplit(".", 1)[-1] for n, _ in s.model.named_buffers()} <= set(BUFFERS)
    assert not getattr(s.model, "_keys_to_ignore_on_load_unexpected", None)


@pytest.mark.parametrize("cfg", [
    {"model_type": "gemma2", **BASE},  # not covered: the meta model decides
    {"model_type": "llama", **BASE, "auto_map": {"AutoModelForCausalLM": "x.Y"}},
    {"model_type": "llama", **BASE, "architectures": ["LlamaForSequenceClassification"]},
    {"model_type": "llama", **{k: v for k, v in BASE.items() if k != "vocab_size"}},  # transformers' default
    {"model_type": "llama", **BASE, "hidden_size": "64"},
    {"model_type": "llama", **BASE, "num_hidden_layers": 10**9},
    {"model_type": "qwen3", **BASE, "num_key_value_heads": 4, "head_dim": None},
    {"model_type": "mistral", **BASE},  # num_key_value_heads: MistralConfig's own default
])
def test_outside_the_rules_falls_back(cfg):
    assert expected_tensors(cfg) is None
    assert check_from_headers(cfg, {}, "x") is False


def test_refusals_name_the_tensor():
    cfg = {"model_type": "llama", **BASE, "num_key_value_heads": 2}
    _, expected, _ = expected_tensors(cfg)
    good = dict(expected)
    assert check_from_headers(cfg, good, "m") is True
    assert check_from_headers(cfg, {**good, "model.rotary_emb.inv_freq": (8,)}, "m") is True
    with pytest.raises(FormatError, match=r"m: tensor lm_head.weight \[100, 64\] is missing"):
        check_from_headers(cfg, {k: v for k, v in good.items() if k != "lm_head.weight"}, "m")
    with pytest.raises(FormatError, match=r"tensor model.layers.1.self_attn.k_proj.weight has shape \[64, 64\], "
                                          r"LlamaForCausalLM with this config expects \[32, 64\]"):
        check_from_headers(cfg, {**good, "model.layers.1.self_attn.k_proj.weight": (64, 64)}, "m")
    with pytest.raises(FormatError, match=r"tensor model.layers.2.mlp.up_proj.weight is not part of LlamaForCausalLM"):
        check_from_headers(cfg, {**good, "model.layers.2.mlp.up_proj.weight": (96, 64)}, "m")


def _tiny_llama(folder: Path, shapes_override: dict | None = None) -> Path:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **BASE, "num_key_value_heads": 2,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    _, expected, tied = expected_tensors(cfg)
    shapes = {k: v for k, v in expected.items() if k not in tied} | (shapes_override or {})
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(v, generator=g) * 0.05).to(torch.bfloat16) for k, v in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("QTOOL_DEBUG", None)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_gguf_run_refuses_a_misshaped_tensor_from_headers(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    _tiny_llama(bad, {"model.layers.1.self_attn.v_proj.weight": (48, 64)})
    out = tmp_path / "o.gguf"
    p = _run("-m", "qtool", "quantize", bad, "-f", "gguf", "-t", "Q8_0", "-o", out, cwd=tmp_path)
    assert p.returncode == 5, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "model.layers.1.self_attn.v_proj.weight has shape [48, 64]" in p.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_gguf_run_checks_from_headers_without_transformers(tmp_path):
    """The check (and the whole Q8_0 conversion of a tokenizer-less folder) imports no transformers
    module; the same folder through another format builds the meta model as before."""
    good = tmp_path / "good"
    good.mkdir()
    _tiny_llama(good)
    code = (
        "import sys\n"
        "from qtool.cli.main import main\n"
        "sys.argv = ['qtool', 'quantize', sys.argv[1], '-f', 'gguf', '-t', 'Q8_0', '-o', sys.argv[2], '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers')))\n"
    )
    p = _run("-c", code, good, tmp_path / "o.gguf", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
    assert (tmp_path / "o.gguf").is_file()
