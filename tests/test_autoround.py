"""Learned rounding (`-m autoround`): the math on one tiny llama decoder block.

The block is transformers' own LlamaDecoderLayer (layer 0 of tests/tiny_models.py's llama), fed
hidden states from the model's embedding and position embeddings from its own rotary module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qtool.core.affine import quantize_int
from qtool.errors import NumericalError, UsageError
from qtool.methods.autoround import (AutoRoundParams, full_range_spec, ImportanceCollector, LinearGrid, block_outputs, importance_rtn,
                                     rtn_block, tune_block)
from qtool.methods.base import BlockInputs, LayerSpec
from qtool.qtypes import QType, get_qtype
from conftest import invoke_cli
from test_gptq_gguf import texts  # noqa: F401  (fixture: calibration file, held-out text)
from tiny_models import make_model

N, L = 16, 32


@pytest.fixture(scope="module")
def blk():
    torch.manual_seed(0)
    model = make_model("llama").float()
    layer = model.model.layers[0]
    ids = torch.randint(0, 256, (N, L))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(L).unsqueeze(0)
        pe = model.model.rotary_emb(h, pos)
    call = ((), dict(position_embeddings=pe, attention_mask=None, position_ids=pos))
    hidden = [h[i : i + 1] for i in range(N)]
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    weights = {m: layer.get_submodule(m).weight.detach().to(torch.bfloat16) for m in names}  # as a checkpoint holds them
    return layer, hidden, call, block_outputs(layer, hidden, call), names, weights


def _specs(names, qtype="int3", group=32, sym=True):
    strategy = "group" if group else "channel"
    return {m: LayerSpec(m, get_qtype(qtype), strategy, group, sym, torch.bfloat16) for m in names}


def _block_mse(blk, qws) -> float:
    """Output MSE of the block with the dequantized weights in place (weights restored after)."""
    layer, hidden, call, targets, names, _ = blk
    orig = {m: layer.get_submodule(m).weight.detach().clone() for m in names}
    try:
        with torch.no_grad():
            for m in names:
                layer.get_submodule(m).weight.copy_(qws[m].dequantize(torch.float32))
        return float((block_outputs(layer, hidden, call) - targets).square().mean())
    finally:
        with torch.no_grad():
            for m in names:
                layer.get_submodule(m).weight.copy_(orig[m])


def _rtn(blk, specs):
    weights = blk[5]
    return {m: quantize_int(weights[m], s.qtype, strategy=s.strategy, group_size=s.group_size, symmetric=s.symmetric)
            for m, s in specs.items()}


# -- the grid -----------------------------------------------------------------------------------------
SIGNED4 = QType("q4_0", "int", 4, -8, 7, torch.int8, signed_scale=True)


@pytest.mark.parametrize("qtype", ["int4", "int3", "int2", "int8", SIGNED4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 48, None])  # 48 leaves a partial last group on 160 columns
def test_untrained_grid_is_round_to_nearest(qtype, sym, group):
    """V = 0, f = 1 gives core/affine's RTN exactly: codes, scales, zero points."""
    qt = qtype if isinstance(qtype, QType) else get_qtype(qtype)
    torch.manual_seed(1)
    w = (torch.randn(24, 160) * 0.05).to(torch.bfloat16)
    spec = LayerSpec("w", qt, "group" if group else "channel", group, sym, torch.float16)
    got = LinearGrid(w, spec).result()
    ref = quantize_int(w, qt, strategy=spec.strategy, group_size=group, symmetric=sym, scale_dtype=torch.float16)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale, ref.scale) and got.scale.dtype == torch.float16
    assert (got.zero_point is None) == (ref.zero_point is None)
    if ref.zero_point is not None:
        assert torch.equal(got.zero_point, ref.zero_point)
    # the tuned forward's Ŵ is exactly what the returned codes dequantize to
    assert torch.equal(LinearGrid(w, spec).qdq().detach(), got.dequantize(torch.float32))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 48, None])
def test_fused_qdq_matches_autograd_reference(sym, group):
    """The one-node quantize-dequantize: same Ŵ, same gradients in V, f_min, f_max as the chain of
    plain autograd ops. ∂f sums the same terms in another order, in float32 and with cancellation
    (Σ g·(q − z) − Σ g·m·W / s): agreement to 1e-3 of the largest entry."""
    torch.manual_seed(2)
    w = torch.randn(40, 160)
    g = LinearGrid(w, LayerSpec("w", get_qtype("int4"), "group" if group else "channel", group, sym, torch.float16))
    with torch.no_grad():
        g.V.uniform_(-0.5, 0.5)
        g.fmin.uniform_(0.6, 1)
        g.fmax.uniform_(0.6, 1)
    for p in g.params():
        p.requires_grad_(True)
    up = torch.randn(40, 160)
    res = []
    for fused in (True, False):
        for p in g.params():
            p.grad = None
        out = g.qdq(fused)
        (out * up).sum().backward()
        res.append((out.detach(), [p.grad.clone() for p in g.params()]))
    assert torch.equal(res[0][0], res[1][0])
    assert torch.equal(res[0][1][0], res[1][1][0])  # ∂V: one product each, no sums
    for a, b in zip(res[0][1][1:], res[1][1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))


def test_ste_gradients_reach_every_parameter(blk):
    """One backward through the block: the rounding offsets and both clipping factors of every
    linear get non-zero gradients (the straight-through round lets them through)."""
    layer, hidden, call, targets, names, weights = blk
    from qtool.methods.autoround import _forward, _stack, _Swapped

    grids = {m: LinearGrid(weights[m], s) for m, s in _specs(names, sym=False).items()}
    layer.requires_grad_(False)
    for g in grids.values():
        for p in g.params():
            p.requires_grad_(True)
    with _Swapped(layer, names) as sw:
        sw.weights = {m: g.qdq() for m, g in grids.items()}
        torch.nn.functional.mse_loss(_forward(layer, _stack(hidden), call), targets).backward()
    for m, g in grids.items():
        for p in g.params():
            assert p.grad is not None and p.grad.abs().sum() > 0, m
    layer.requires_grad_(True)


# -- tuning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_learned_rounding_beats_rtn(blk, sym):
    """int3 g32, 30 full-batch iterations: the block's output MSE with the returned weights is the
    best loss the tuning saw, ≤ iteration 0's (which is RTN), and well below RTN's (< 0.7x)."""
    layer, hidden, call, targets, names, weights = blk
    specs = _specs(names, sym=sym)
    before = {m: layer.get_submodule(m).weight.detach().clone() for m in names}
    qws, st = tune_block(layer, specs, hidden, call, targets, AutoRoundParams(iters=30, batch_size=N), weights=weights)
    assert all(torch.equal(before[m], layer.get_submodule(m).weight) for m in names)  # the block is left unchanged
    assert all(p.grad is None and p.requires_grad for p in layer.parameters())  # and untrained
    rtn = _block_mse(blk, _rtn(blk, {m: full_range_spec(s) for m, s in specs.items()}))  # --full-range (default)
    got = _block_mse(blk, qws)
    assert st.init_loss == pytest.approx(rtn, rel=1e-5)
    assert got == pytest.approx(st.best_loss, rel=1e-5)
    assert st.best_loss <= st.init_loss and st.best_loss == min(st.losses)
    assert got < 0.7 * rtn, (got, rtn)
    for m in names:  # integer results on the requested grid
        q = qws[m]
        assert q.codes.dtype == torch.int8 and q.codes.shape == weights[m].shape and q.scale.dtype == torch.bfloat16
        assert int(q.codes.min()) >= -4 and int(q.codes.max()) <= 3
        assert (q.zero_point is None) == sym


@pytest.mark.parametrize("full_range", [True, False])
def test_iteration_zero_is_rtn_on_the_chosen_symmetric_grid(blk, full_range):
    """Iteration 0 is round-to-nearest on the full-range grid (scale = signed peak / qmin, all 2^b
    codes) by default, on compressed-tensors' max|w| / ((2^b - 1) / 2) with --no-full-range."""
    layer, hidden, call, targets, names, weights = blk
    specs = _specs(names, sym=True)
    _, st = tune_block(layer, specs, hidden, call, targets, AutoRoundParams(iters=1, batch_size=N, full_range=full_range),
                       weights=weights)
    full = _block_mse(blk, _rtn(blk, {m: full_range_spec(s) for m, s in specs.items()}))
    plain = _block_mse(blk, _rtn(blk, specs))
    assert full != pytest.approx(plain, rel=1e-3)
    assert st.init_loss == pytest.approx(full if full_range else plain, rel=1e-5)


def test_minibatches_and_determinism(blk):
    """Batches of 4 of the 16 samples: the same seed gives bit-identical codes and losses; another
    seed another batch order."""
    layer, hidden, call, targets, names, weights = blk
    specs = _specs(names, "int4", 32)
    runs = [tune_block(layer, specs, hidden, call, targets, AutoRoundParams(iters=8, batch_size=4, batch_seed=s), weights=weights)
            for s in (7, 7, 8)]
    (a, sa), (b, sb), (c, sc) = runs
    assert sa.losses == sb.losses
    assert all(torch.equal(a[m].codes, b[m].codes) and torch.equal(a[m].scale, b[m].scale) for m in names)
    assert sa.losses != sc.losses


def test_a_linear_no_token_reaches_stays_round_to_nearest(blk):
    """Like an MoE expert the router never picks: a linear of the block the forward never calls gets
    no gradient, keeps RTN's codes, and is reported; the others are still tuned."""
    layer, hidden, call, targets, names, weights = blk
    layer.add_module("idle", torch.nn.Linear(96, 64, bias=False))
    try:
        specs = _specs(names + ["idle"])
        w = {**weights, "idle": layer.idle.weight.detach().to(torch.bfloat16)}
        qws, st = tune_block(layer, specs, hidden, call, targets, AutoRoundParams(iters=4, lr=0.01, batch_size=N), weights=w)
        assert st.unreached == ["idle"]
        rtn = quantize_int(w["idle"], full_range_spec(specs["idle"]).qtype, strategy="group", group_size=32)
        assert torch.equal(qws["idle"].codes, rtn.codes)
        assert st.best_loss < st.init_loss
    finally:
        del layer.idle


def test_samples_gathered_per_batch_equal_stacked(blk, monkeypatch):
    """Inputs too large to stack on the device are gathered batch by batch: the same run."""
    import qtool.methods.autoround as ar

    layer, hidden, call, targets, names, weights = blk
    p = AutoRoundParams(iters=3, batch_size=4)
    a, sa = tune_block(layer, _specs(names), hidden, call, targets, p, weights=weights)
    monkeypatch.setattr(ar, "STACK_BYTES", 0)
    b, sb = tune_block(layer, _specs(names), hidden, call, list(targets), p, weights=weights)
    assert sa.losses == sb.losses and all(torch.equal(a[m].codes, b[m].codes) for m in names)


def test_bf16_autocast_runs(blk):
    layer, hidden, call, targets, names, weights = blk
    qws, st = tune_block(layer, _specs(names, "int4", 32), hidden, call, targets,
                         AutoRoundParams(iters=6, batch_size=N, amp=True), weights=weights)
    assert math.isfinite(st.best_loss) and st.best_loss <= st.init_loss


def test_nan_loss_reverts_to_best_and_names_the_block(blk):
    """The block's output turns NaN from the 4th forward on: tuning stops, keeps the best of the
    first three iterations and says which block; NaN at the very first iteration is an error."""
    layer, hidden, call, targets, names, weights = blk
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        if calls["n"] > calls["from"]:
            return out * float("nan")

    h = layer.mlp.register_forward_hook(poison)
    try:
        calls["from"] = 3
        qws, st = tune_block(layer, _specs(names), hidden, call, targets, AutoRoundParams(iters=10, batch_size=N),
                             block_name="model.layers.0", weights=weights)
        assert st.iters_run == 4 and st.warning and "model.layers.0" in st.warning and "iteration 3" in st.warning
        assert st.best_iter < 3 and math.isfinite(st.best_loss)
        calls["from"] = 10**9  # stop poisoning: the returned weights reproduce the best loss
        assert _block_mse(blk, qws) == pytest.approx(st.best_loss, rel=1e-5)
        calls["n"], calls["from"] = 0, 0
        with pytest.raises(NumericalError, match="model.layers.0"):
            tune_block(layer, _specs(names), hidden, call, targets, AutoRoundParams(iters=3, batch_size=N),
                       block_name="model.layers.0", weights=weights)
    finally:
        h.remove()


@pytest.mark.parametrize("kw, msg", [
    (dict(iters=-1), "--iters"),
    (dict(lr=0.0), "--lr"),
    (dict(lr=-1e-3), "--lr"),
    (dict(batch_size=17), "--batch-size"),
    (dict(batch_size=0), "--batch-size"),
])
def test_bad_parameters(kw, msg):
    with pytest.raises(UsageError, match=msg):
        AutoRoundParams(**kw).validate(samples=16)  # the first four fail in the constructor already


def test_float_and_tensor_specs_refused():
    w = torch.randn(8, 32)
    with pytest.raises(UsageError, match="w: autoround produces integer"):
        LinearGrid(w, LayerSpec("w", get_qtype("fp8"), "channel", None, True))
    with pytest.raises(UsageError, match="per-channel or grouped"):
        LinearGrid(w, LayerSpec("w", get_qtype("int4"), "tensor", None, True))


# -- iters = 0 ----------------------------------------------------------------------------------------
def test_importance_weighted_rtn(blk):
    """Per layer, Σ_j E[x_j²] (W − Ŵ)²_ij is ≤ plain RTN's (f = 1 is on the search grid) and lower
    in total; the block's output MSE drops too."""
    layer, hidden, call, targets, names, weights = blk
    specs = _specs(names, "int3", 32, sym=False)
    col = ImportanceCollector(layer, names)
    try:
        block_outputs(layer, hidden, call)
    finally:
        col.remove()
    rtn = _rtn(blk, specs)
    tot_imp = tot_rtn = 0.0
    for m in names:
        imp = col.mean_x2(m)
        q = importance_rtn(weights[m], specs[m], imp)
        w = weights[m].float()
        e_imp = float(((w - q.dequantize(torch.float32)).square() * imp).sum())
        e_rtn = float(((w - rtn[m].dequantize(torch.float32)).square() * imp).sum())
        assert e_imp <= e_rtn * (1 + 1e-6), m
        tot_imp, tot_rtn = tot_imp + e_imp, tot_rtn + e_rtn
    assert tot_imp < 0.9 * tot_rtn
    qws = rtn_block(layer, specs, BlockInputs("model.layers.0", hidden, call, torch.device("cpu")), weights=weights)
    assert _block_mse(blk, qws) < _block_mse(blk, rtn)


# -- end to end ---------------------------------------------------------------------------------------
def _quantize(model: Path, out: Path, *args: object) -> dict:
    """`qtool quantize MODEL -b 4 -g 32 -f compressed-tensors ARGS --json` in-process -> its report."""
    res = invoke_cli("quantize", model, "-b", "4", "-g", "32", "-f", "compressed-tensors", *args, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def e2e(tiny_byte_llama, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ar-e2e")
    calib = ("--dataset", texts[0], "--samples", "8", "--seq-len", "64")
    return {name: (root / name, _quantize(tiny_byte_llama, root / name, *args)) for name, args in [
        ("autoround", ("-m", "autoround", "--iters", "20", "--batch-size", "4", *calib)),
        ("iters0", ("-m", "autoround", "--iters", "0", *calib)),
        ("rtn", ("-m", "rtn")),
    ]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def _held_out_ids(model_dir: Path, held_out: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(held_out, return_tensors="pt").input_ids[:, :192]


def test_transformers_loads_autoround_compressed_tensors_and_predicts_our_logits(e2e, tiny_byte_llama, texts):
    """transformers + compressed-tensors load the output; its logits are those of the float model
    holding our own dequantized weights (QuantizedWeight.dequantize via the format reader)."""
    from transformers import AutoModelForCausalLM

    from qtool.formats.compressed_tensors import read_dequantized

    out, report = e2e["autoround"]
    ids = _held_out_ids(tiny_byte_llama, texts[1])
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    ref = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    res = ref.load_state_dict(read_dequantized(out), strict=False)
    assert not res.unexpected_keys and not res.missing_keys
    want = _logits(ref, ids)
    # the same weights in float32 on both sides; only matmul summation order may differ
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    layers = report["layers"]
    assert len(layers) == 14
    for layer in layers:
        st = layer["gptq"]  # the method's per-layer figures
        assert st["iters"] == 20 and st["loss"] <= st["loss_rtn"] and 0 <= st["best_iter"] < 20


def test_autoround_beats_rtn_on_held_out_text(e2e, tiny_byte_llama, texts):
    """KL(original || quantized) of next-token distributions on text calibration never saw: learned
    rounding (20 iterations) below plain RTN and below importance-weighted RTN (--iters 0).
    Measured: 0.0103 vs RTN 0.0209; --iters 0 gave 0.0243 here (its per-layer importance-weighted
    error is lower than RTN's, test_importance_weighted_rtn, but on this random model that does not
    carry over to held-out logits), so it is not claimed to beat RTN."""
    from transformers import AutoModelForCausalLM

    ids = _held_out_ids(tiny_byte_llama, texts[1])
    p = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32), ids), -1)

    def kl(name: str) -> float:
        q = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(e2e[name][0], dtype=torch.float32), ids), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    k = {name: kl(name) for name in e2e}
    assert k["autoround"] < k["rtn"], k
    assert k["autoround"] < k["iters0"], k
    layers = e2e["iters0"][1]["layers"]
    assert len(layers) == 14 and all(layer["gptq"]["iters"] == 0 for layer in layers)


@pytest.mark.parametrize("args, msg", [
    (("--iters", "-1"), "--iters -1"),
    (("--lr", "0"), "--lr 0"),
    (("--lr", "-0.01"), "--lr -0.01"),
    (("--batch-size", "9"), "--batch-size 9: larger than --samples 8"),
])
def test_cli_refuses_bad_options_before_loading(tmp_path, args, msg):
    """Exit 2 naming the option, from the flags alone: the model path does not even exist."""
    res = invoke_cli("quantize", tmp_path / "no-such-model", "-m", "autoround", "-b", "4", "--dataset", "wikitext2",
                     "--samples", "8", *args, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert msg in res.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def _eager_block():
    torch.manual_seed(0)
    model = make_model("llama").float()
    model.config._attn_implementation = "eager"  # as the engine builds blocks (qtool/model/structure.py)
    layer = model.model.layers[0]
    h = torch.randn(2, L, model.config.hidden_size)
    pos = torch.arange(L).unsqueeze(0)
    pe = model.model.rotary_emb(h, pos)
    causal = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
    return model, layer, h, pe, pos, causal


def test_tuning_runs_attention_through_sdpa_where_it_equals_eager():
    """fast_attention: with the engine's causal float mask, sdpa gives the eager outputs (to 1e-4 of
    their largest) and is used; the config is eager again afterwards. With no mask, eager attends
    both ways and sdpa causally: they differ, and the block stays eager."""
    from qtool.engine.attention import ATTENTION_TOL, fast_attention
    from qtool.engine.attention import block_forward as _forward

    model, layer, h, pe, pos, causal = _eager_block()
    call = ((), dict(position_embeddings=pe, attention_mask=causal, position_ids=pos))
    with torch.no_grad():
        ref = _forward(layer, h, call)
    with fast_attention(layer, h[:1], call) as impl:
        assert impl == "sdpa" and model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            got = _forward(layer, h, call)
    assert model.config._attn_implementation == "eager"
    assert float((got - ref).abs().max()) <= ATTENTION_TOL * float(ref.abs().max())
    unmasked = ((), dict(position_embeddings=pe, attention_mask=None, position_ids=pos))
    with fast_attention(layer, h[:1], unmasked) as impl:
        assert impl == "eager" and model.config._attn_implementation == "eager"


def test_samples_read_the_engines_store_in_place():
    """The tuning loop's batches come from a view of the engine's activation store (RAM or
    disk-mapped), not a stacked copy: a copy of the inputs and one of the targets were ~1 GiB of the
    random 1.1 B's peak at 128 x 512."""
    from qtool.engine.activations import ActivationStore
    from qtool.methods.autoround import _Samples

    for where in ("ram", "disk"):
        store = ActivationStore.from_tensors([torch.randn(1, 5, 4) for _ in range(6)], where)
        xs = _Samples(store, torch.device("cpu"))
        assert xs.stacked.data_ptr() == store.stacked().data_ptr() and xs.stacked.shape == (6, 5, 4)
        idx = torch.tensor([4, 1])
        assert torch.equal(xs.batch(idx), torch.cat([store[4], store[1]]))
