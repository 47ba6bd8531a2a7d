"""The block-wise calibration engine: true-sequential groups inside a block."""

from __future__ import annotations

import torch

from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.qtypes import get_qtype

SAMPLES, SEQ = 2, 32


def _ids(model_dir, text):
    from transformers import AutoTokenizer

    from qtool.calib.data import load_calibration

    return load_calibration(str(text), AutoTokenizer.from_pretrained(model_dir), samples=SAMPLES, seq_len=SEQ).input_ids


def test_groups_follow_the_forward_and_see_quantized_predecessors(tiny_byte_llama, wiki_sample, monkeypatch):
    """Block 0 is quantized group by group: q/k/v (one shared input), o, gate/up, down. The Hessian
    of o_proj is that of a float model whose q/k/v already hold their quantized weights, and
    down_proj's that of a float model whose other six linears do."""
    from transformers import AutoModelForCausalLM

    from qtool.engine import blockwise
    from qtool.model.resolve import open_source

    seen: dict[str, torch.Tensor] = {}
    real = blockwise.HessianCollector.hessian
    monkeypatch.setattr(blockwise.HessianCollector, "hessian", lambda self, n: seen.setdefault(n, real(self, n)))
    ids = _ids(tiny_byte_llama, wiki_sample)
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.0.{m}.weight" for m in linears]
    with open_source(str(tiny_byte_llama)) as src:
        specs = {n: LayerSpec(n, get_qtype("int2"), "channel", None, True) for n in names}
        items = [it for it in blockwise.run_blockwise(src, specs, METHODS.get("gptq")(), ids) if hasattr(it, "qw")]
        order = [it.name for it in items]
        q = {it.name: it.qw.dequantize(torch.float32) for it in items}
    assert order == names  # the forward's order, groups kept together
    assert [it.shares_hessian_with for it in items][:3] == [None, names[0], names[0]]

    model = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    layer = model.model.layers[0]

    def hessian(module: str) -> torch.Tensor:
        xs = []
        h = layer.get_submodule(module).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for row in ids:
                model(row.unsqueeze(0))
        h.remove()
        X = torch.cat(xs)
        return 2 / X.shape[0] * X.T @ X

    def load(upto: int) -> None:
        with torch.no_grad():
            for m, n in zip(linears[:upto], names[:upto]):
                layer.get_submodule(m).weight.copy_(q[n])

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    h_float_o = hessian("self_attn.o_proj")
    load(3)
    h_o = hessian("self_attn.o_proj")
    assert rel(seen["self_attn.o_proj"], h_o) < 1e-5 and rel(h_o, h_float_o) > 1e-3
    load(6)
    assert rel(seen["mlp.down_proj"], hessian("mlp.down_proj")) < 1e-5
