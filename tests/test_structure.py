"""qtool/model/structure.py and qtool/engine/taps.py: what is derived from transformers' meta model,
and the expert taps' statistics against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import build_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("structure")
    return {a: build_tiny(a, root / a) for a in ("qwen3_moe", "gemma3", "gpt_oss")}


def _discover(folder):
    from safetensors import safe_open

    from qtool.model.structure import discover

    with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
        shapes = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    return discover(json.loads((folder / "config.json").read_text()), shapes), shapes


def test_moe_experts_in_checkpoint_names(folders):
    s, shapes = _discover(folders["qwen3_moe"])
    assert s.layout == "saved" and s.block_prefixes() == ["model.layers.0", "model.layers.1"]
    assert set(s.expected) == set(shapes)
    b = s.blocks[1]
    assert b.experts["model.layers.1.mlp.experts.3.down_proj.weight"] == 3
    assert b.linears["model.layers.1.mlp.experts.3.up_proj.weight"] == "model.layers.1.mlp.experts.gate_up_proj"
    assert "model.layers.1.mlp.gate.weight" not in b.linears  # the router is no nn.Linear in 5.x


def test_multimodal_blocks_are_the_language_models(folders):
    s, _ = _discover(folders["gemma3"])
    assert s.family.multimodal and s.decoder_layers == "model.language_model.layers"
    assert s.block_prefixes() == ["language_model.model.layers.0", "language_model.model.layers.1"]
    assert s.block_of("vision_tower.encoder.layers.0.mlp.fc1.weight") is None
    assert s.block_of("language_model.model.layers.1.mlp.up_proj.weight") == "language_model.model.layers.1"
    assert s.memory_module("language_model.model.layers.1.mlp.up_proj") == "model.language_model.layers.1.mlp.up_proj"
    assert not any("vision" in n for n in s.linears())


def test_fused_checkpoint_experts_are_not_linears(folders):
    s, _ = _discover(folders["gpt_oss"])
    assert s.fused_experts() == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert not s.expert_names()


def test_expert_taps_see_exactly_the_routed_tokens(folders):
    """The Hessian a tap collects for expert e equals Σ XᵀX over the tokens the router sent to e,
    computed here from the experts module's own inputs (hidden states and top-k indices)."""
    from qtool.engine.blockwise import BlockRunner, HessianCollector
    from qtool.model.safetensors_source import SafetensorsSource

    torch.manual_seed(0)
    with SafetensorsSource(folders["qwen3_moe"]) as src:
        runner = BlockRunner(src, torch.randint(0, 256, (2, 24)))
        for b, prefix, block in runner.blocks():
            names = runner.linears(prefix, block, set(src.structure.blocks[b].linears))
            taps = {m: block.get_submodule(m) for m in names if ".experts." in m}
            seen = []
            handle = block.mlp.experts.register_forward_pre_hook(lambda mod, args: seen.append((args[0], args[1])))
            c = HessianCollector(taps)
            runner.run(b, block, c)
            handle.remove()
            for e in range(4):
                want = sum(x[(idx == e).any(-1)].T @ x[(idx == e).any(-1)] for x, idx in seen)
                got = c.sum[c.owner[f"mlp.experts.{e}.gate_proj"]]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
                assert c.owner[f"mlp.experts.{e}.up_proj"] == f"mlp.experts.{e}.gate_proj"  # one input, shared
                w = block.get_submodule(f"mlp.experts.{e}.up_proj").weight
                assert torch.equal(w, src.get_tensor(f"{prefix}.mlp.experts.{e}.up_proj.weight").float())
            runner.advance(runner.run(b, block))


def test_inspect_capabilities_agree_with_the_built_model(tmp_path):
    """`qtool inspect`'s quick answer (qtool/model/arch_facts.py, transformers' tables read without
    importing it) says "quantize: yes" exactly where the model built on the meta device is accepted."""
    import json

    from qtool.errors import QtoolError
    from qtool.model.arch_facts import light_capabilities
    from qtool.model.structure import discover
    from tiny_models import ZOO_NAMES, make_config

    configs = {a: make_config(a).to_dict() for a in ZOO_NAMES}
    configs["bert-mlm"] = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 64}
    configs["unknown"] = {"model_type": "no_such_model", "architectures": ["NoSuchForCausalLM"]}
    for name, cfg in configs.items():
        cfg = json.loads(json.dumps(cfg, default=str))
        try:
            discover(cfg)
            accepted = True
        except QtoolError:
            accepted = False
        assert (light_capabilities(cfg)["quantize"] == "yes") == accepted, (name, light_capabilities(cfg))
