"""engine/memo.py: the outputs of a block's finished linears, reused by GPTQ's later passes and by
the engine's forward for the next block's inputs, give bit-identical results to recomputing them
(QTOOL_MEMO=0, the reference path), and a stale output is never served."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtool.engine.memo import LinearMemo
from qtool.methods import METHODS

from test_block_engine import _items, _specs, ids  # noqa: F401  (fixture)


def _run(model_dir, ids, params, monkeypatch, memo_on: bool):
    from qtool.engine import block_engine
    from qtool.engine.block_engine import run_block_method
    from qtool.model.resolve import open_source

    hits, linear_calls = [], [0]
    real_close = LinearMemo.close

    def spy_close(self):
        hits.append(self.hits)
        real_close(self)

    real_linear = nn.Linear.forward

    def counting(self, x):
        linear_calls[0] += 1
        return real_linear(self, x)

    monkeypatch.setattr(LinearMemo, "close", spy_close)
    monkeypatch.setattr(nn.Linear, "forward", counting)
    monkeypatch.setenv("QTOOL_MEMO", "1" if memo_on else "0")
    assert block_engine.memo_budget() > 0 if memo_on else block_engine.memo_budget() == 0
    with open_source(str(model_dir)) as src:
        items = _items(run_block_method(src, _specs(src, symmetric=False), METHODS.get("gptq")(**params), ids))
    monkeypatch.undo()
    return items, sum(hits), linear_calls[0]


@pytest.mark.parametrize("params", [{}, {"act_order": True}], ids=["default", "act-order"])
def test_reused_outputs_are_bit_identical_to_recomputing(tiny_byte_llama, ids, params, monkeypatch):  # noqa: F811
    ref, ref_hits, ref_calls = _run(tiny_byte_llama, ids, params, monkeypatch, memo_on=False)
    new, hits, calls = _run(tiny_byte_llama, ids, params, monkeypatch, memo_on=True)
    assert ref_hits == 0 and hits > 0
    assert calls < 0.5 * ref_calls  # linears computed (a served attention output skips four)
    assert list(ref) == list(new)
    for name, a in ref.items():
        b = new[name]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
            continue
        qa, qb = a[0], b[0]
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale), name
        assert torch.equal(qa.zero_point, qb.zero_point), name
        assert a[1] == b[1] and a[2] == b[2], name  # stats (loss...) and the shared-Hessian owner


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _call(memo, block, x, sample=0):
    memo.begin_pass()
    memo.begin_sample(sample)
    with torch.no_grad():
        return block(x)


def test_a_changed_weight_or_input_is_recomputed():
    block, memo = _toy(), LinearMemo(1 << 20)
    x = torch.randn(5, 8)
    memo.freeze(block, ["0", "1"])  # "1" (ReLU) is not a linear: left alone
    assert [type(m).__name__ for m in memo.frozen] == ["Linear"]
    y0 = _call(memo, block, x)
    assert memo.hits == 0 and memo.used > 0
    y1 = _call(memo, block, x)
    assert memo.hits == 1 and torch.equal(y0, y1)
    y1.add_(1)  # the caller changing its copy in place does not reach what is kept
    assert torch.equal(_call(memo, block, x), y0) and memo.hits == 2
    with torch.no_grad():
        block[0].weight[0, 0] += 1e-3  # the frozen weight changed: unfrozen at the next pass, outputs dropped
    y2 = _call(memo, block, x)
    assert memo.hits == 2 and not memo.frozen and memo.used == 0
    with torch.no_grad():
        assert torch.equal(y2, block[2](torch.relu(nn.functional.linear(x, block[0].weight, block[0].bias))))
    memo.freeze(block, ["0"])
    _call(memo, block, x)
    x2 = x.clone()
    x2[3, 2] = torch.nextafter(x2[3, 2], torch.tensor(10.0))  # one ulp of one input element
    with torch.no_grad():
        want = block[2](torch.relu(nn.functional.linear(x2, block[0].weight, block[0].bias)))
    assert torch.equal(_call(memo, block, x2), want) and memo.hits == 2
    memo.close()
    assert "forward" not in block[0].__dict__ and memo.used == 0


def test_outputs_past_the_budget_are_recomputed_and_samples_kept_apart():
    block = _toy()
    memo = LinearMemo(5 * 16 * 4)  # room for one sample's output of linear 0
    memo.freeze(block, ["0"])
    xs = [torch.randn(5, 8) for _ in range(2)]
    first = [_call(memo, block, x, i) for i, x in enumerate(xs)]
    assert len(memo.store) == 1
    again = [_call(memo, block, x, i) for i, x in enumerate(xs)]
    assert memo.hits == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    memo.close()
    off = LinearMemo(0)  # budget 0 (QTOOL_MEMO=0): freezes nothing, every pass recomputes
    off.freeze(block, ["0"])
    assert not off.frozen and "forward" not in block[0].__dict__


class _Attn(nn.Module):
    """A submodule holding linears and taking keyword arguments, as a transformers attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x, *, scale=None, extra=None):
        return self.o(torch.softmax(self.q(self.norm(x)) * scale, -1)), None


def test_a_submodule_is_memoised_once_all_its_linears_are_final():
    torch.manual_seed(0)
    block = nn.ModuleDict({"attn": _Attn(), "mlp": nn.Linear(8, 8)})
    memo = LinearMemo(1 << 20)
    x, scale, marker = torch.randn(3, 8), torch.tensor(0.5), object()

    def run(s=scale, extra=marker):
        memo.begin_pass()
        memo.begin_sample(0)
        with torch.no_grad():
            return block["mlp"](block["attn"](x, scale=s, extra=extra)[0])

    memo.freeze(block, ["attn.q"])
    assert block["attn"] not in memo.frozen  # o is not final yet
    memo.freeze(block, ["attn.o"])
    assert block["attn"] in memo.frozen and block["mlp"] not in memo.frozen
    y = run()
    hits = memo.hits
    assert torch.equal(run(), y) and memo.hits == hits + 1  # the attention output served whole
    assert not [k for k in memo.store if k[0] in (id(block["attn"].q), id(block["attn"].o))]  # children's copies freed
    hits = memo.hits
    run(s=torch.tensor(0.25))  # another tensor argument: recomputed
    run(extra=object())  # another object: recomputed
    assert memo.hits == hits
    with torch.no_grad():
        block["attn"].norm.weight.mul_(2)  # a parameter that no linear holds changed: unfrozen
    memo.begin_pass()
    assert block["attn"] not in memo.frozen
    memo.close()
    assert not any("forward" in m.__dict__ for m in block.modules())
