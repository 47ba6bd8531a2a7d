"""GPTQ (qtool/methods/gptq.py) and the block-wise engine (qtool/engine/blockwise.py).

Pure-function tests on random layers with random positive-definite Hessians, then end to end on a
tiny llama (bf16, byte-level tokenizer saved beside it) calibrated on a local text file: the
compressed-tensors folder loads in transformers, predicts our dequantized reference's logits, and
beats RTN on held-out text; the engine is sequential (block i sees the quantized block i-1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtool.core.affine import quantize_int
from qtool.errors import UnsupportedError, UsageError
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.methods.gptq import (GPTQParams, gptq_quantize, inverse_hessian_cholesky, inverse_hessian_cholesky_reference,
                                output_error)
from qtool.qtypes import get_qtype

INT4, INT3 = get_qtype("int4"), get_qtype("int3")


def random_layer(out_f: int, in_f: int, seed: int, tokens: int = 512):
    """W [out, in] and H = 2/n XᵀX from correlated inputs with uneven column energy."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * torch.rand(in_f, generator=g) * 2
    return W, 2 / tokens * X.T @ X


# -- pure functions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [None, 32, 40], ids=["channel", "g32", "g40-partial-last"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    "params",
    [GPTQParams(), GPTQParams(act_order=True, group_aware=False),
     GPTQParams(act_order=True, static_groups=True, group_aware=False), GPTQParams(block_size=16)],
    ids=["default", "act-order", "act-order-static", "block16"],
)
def test_gptq_output_error_beats_rtn_on_the_same_grid(group_size, symmetric, params):
    W, H = random_layer(48, 96, seed=1)
    qw, stats = gptq_quantize(W, H, INT4, group_size=group_size, symmetric=symmetric, params=params)
    rtn = quantize_int(W, INT4, strategy="group" if group_size else "channel", group_size=group_size, symmetric=symmetric)
    e_gptq = output_error(W, qw.dequantize(torch.float32), H)
    e_rtn = output_error(W, rtn.dequantize(torch.float32), H)
    # GPTQ minimises exactly this objective column by column; on correlated inputs it roughly
    # halves RTN's error here (measured 0.45-0.5x). 0.8 leaves room for seeds, not for a broken loop.
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert stats.retries == 0 and stats.damp == params.damp
    assert int(qw.codes.min()) >= INT4.qmin and int(qw.codes.max()) <= INT4.qmax


def _rtn_on_mse_grid(W: torch.Tensor, group_size: int | None, symmetric: bool):
    """Round to nearest on core/mse_grid's clipped ranges (what --mse measures per group), written out."""
    from qtool.core.grouping import to_groups
    from qtool.core.mse_grid import mse_qparams

    Wf = W.float()
    s, z = mse_qparams(to_groups(Wf, group_size or Wf.shape[1]), INT4, symmetric, W.dtype)  # [out, G]
    k = group_size or Wf.shape[1]
    sf = s.float().repeat_interleave(k, 1)[:, : Wf.shape[1]]
    zf = torch.zeros_like(sf) if z is None else z.float().repeat_interleave(k, 1)[:, : Wf.shape[1]]
    codes = (Wf / sf + zf).round().clamp(INT4.qmin, INT4.qmax).to(torch.int8)
    return codes, s, z


@pytest.mark.parametrize("mse", [False, True], ids=["minmax", "mse"])
@pytest.mark.parametrize("group_size", [None, 32, 40], ids=["channel", "g32", "g40"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_identity_hessian_gives_exactly_rtn(group_size, symmetric, mse):
    """H = I: Hinv is diagonal, no error propagates, so every column rounds as RTN does on the same
    grid: min/max (core/affine) with --no-mse, the MSE-clipped ranges with --mse (the default)."""
    W = torch.randn(24, 80, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qw, _ = gptq_quantize(W, torch.eye(80), INT4, group_size=group_size, symmetric=symmetric,
                          params=GPTQParams(block_size=32, mse=mse))
    if mse:
        codes, scale, zero = _rtn_on_mse_grid(W, group_size, symmetric)
        plain = quantize_int(W, INT4, strategy="group" if group_size else "channel", group_size=group_size, symmetric=symmetric)
        assert not torch.equal(scale, plain.scale)  # the search clipped some ranges: the case is not min/max again
        assert torch.equal(qw.codes, codes) and torch.equal(qw.scale, scale) and qw.scale.dtype == torch.bfloat16
        assert (qw.zero_point is None) == symmetric and (symmetric or torch.equal(qw.zero_point, zero))
        return
    rtn = quantize_int(W, INT4, strategy="group" if group_size else "channel", group_size=group_size, symmetric=symmetric)
    assert torch.equal(qw.codes, rtn.codes)
    assert torch.equal(qw.scale, rtn.scale) and qw.scale.dtype == torch.bfloat16
    assert (qw.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(qw.zero_point, rtn.zero_point)


def test_lazy_blocks_are_exactly_the_column_by_column_algorithm():
    """block_size 1 is the plain per-column loop; other block sizes must give the same codes
    (groups straddling a block boundary included: g40 vs blocks of 16/128)."""
    W, H = random_layer(16, 96, seed=3)
    ref, _ = gptq_quantize(W.double().float(), H, INT4, group_size=40, symmetric=False, params=GPTQParams(block_size=1))
    for bs in (16, 128):
        qw, _ = gptq_quantize(W, H, INT4, group_size=40, symmetric=False, params=GPTQParams(block_size=bs))
        # float32 summation order differs between schedules: allow a handful of rounding ties
        assert (qw.codes != ref.codes).float().mean() < 0.01


@pytest.mark.parametrize("n", [1, 7, 96, 300])
def test_inverse_hessian_cholesky_is_the_reference_factor(n):
    """One factorisation + a triangular inverse (reversed order) gives the factor the reference's
    three steps give: upper triangular, UᵀU = (H + λI)⁻¹."""
    _, H = random_layer(4, n, seed=10 + n)
    H = (H + H.T) / 2  # a float32 XᵀX is symmetric to rounding only; one method reads its lower, one its upper half
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        U, damp, retries = inverse_hessian_cholesky(H.to(dtype), 0.01)
        R, damp_r, retries_r = inverse_hessian_cholesky_reference(H.to(dtype), 0.01)
        assert (damp, retries) == (damp_r, retries_r) == (0.01, 0) and U.dtype == dtype
        assert torch.all(U.tril(-1) == 0) and torch.all(U.diagonal() > 0)
        assert float((U - R).norm() / R.norm()) < tol
    Hd = H.double() + 0.01 * H.diag().double().mean() * torch.eye(n, dtype=torch.float64)
    U, _, _ = inverse_hessian_cholesky(H.double(), 0.01)
    assert torch.allclose(U.T @ U @ Hd, torch.eye(n, dtype=torch.float64), atol=1e-8)


# the fast schedule (_loop_fast) against the column-by-column reference (_loop_reference): every
# feature that changes the loop's control flow, on a layer with a dead input column
# PLAIN: the algorithm before the bench-chosen defaults (damp 0.05, group-aware, mse), so that each case
# isolates the feature that changes the loop's control flow; the "defaults-" cases run the defaults (on
# bf16 scales these agree exactly too; for float64 scales see tests/test_gptq_group_aware.py).
PLAIN = dict(damp=0.01, group_aware=False, mse=False)
LOOP_CASES = {
    "channel-sym": dict(group_size=None, symmetric=True, params=GPTQParams(**PLAIN)),
    "channel-asym-act-order": dict(group_size=None, symmetric=False, params=GPTQParams(**PLAIN, act_order=True)),
    "g32-sym": dict(group_size=32, symmetric=True, params=GPTQParams(**PLAIN)),
    "g40-asym-partial-last": dict(group_size=40, symmetric=False, params=GPTQParams(**PLAIN)),
    "g40-act-order-dynamic": dict(group_size=40, symmetric=True, params=GPTQParams(**PLAIN, act_order=True)),
    "g40-asym-act-order-static": dict(group_size=40, symmetric=False, params=GPTQParams(**PLAIN, act_order=True, static_groups=True)),
    "g24-block50": dict(group_size=24, symmetric=False, params=GPTQParams(**PLAIN, block_size=50)),  # groups straddle blocks
    "g40-block7": dict(group_size=40, symmetric=True, params=GPTQParams(**PLAIN, block_size=7)),  # blocks < sub-blocks
    "int3-g64-block1": dict(group_size=64, symmetric=True, params=GPTQParams(**PLAIN, block_size=1), qtype=INT3),
    "defaults-g40-asym": dict(group_size=40, symmetric=False, params=GPTQParams()),
    "defaults-g24-sym-block50": dict(group_size=24, symmetric=True, params=GPTQParams(block_size=50)),
    "defaults-int3-g64-block7": dict(group_size=64, symmetric=False, params=GPTQParams(block_size=7), qtype=INT3),
}


def _loop_layer():
    W, H = random_layer(40, 200, seed=7)  # 200 columns: partial last groups for 24, 32, 40 and 64
    H[:, 11] = H[11, :] = 0  # a dead input
    return W.to(torch.bfloat16), H


@pytest.mark.parametrize("sub_block", [1, 5, 16])
@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_fast_loop_is_the_reference_loop_in_float64(case, sub_block, monkeypatch):
    """In float64 summation order cannot flip a rounding, so the fast schedule must give exactly
    the reference's codes, scales, zero points and group map, for any sub-block size."""
    from qtool.methods import gptq

    monkeypatch.setattr(gptq, "SUB_BLOCK", sub_block)
    kw = dict(LOOP_CASES[case])
    qtype = kw.pop("qtype", INT4)
    W, H = _loop_layer()
    fast, s_fast = gptq_quantize(W, H, qtype, dtype=torch.float64, **kw)
    ref, s_ref = gptq_quantize(W, H, qtype, dtype=torch.float64, reference=True, **kw)
    assert torch.equal(fast.codes, ref.codes)
    assert torch.equal(fast.scale, ref.scale) and fast.scale.dtype == torch.bfloat16
    assert (fast.zero_point is None) == (ref.zero_point is None) == kw["symmetric"]
    if fast.zero_point is not None:
        assert torch.equal(fast.zero_point, ref.zero_point)
    assert (fast.g_idx is None) == (ref.g_idx is None)
    if fast.g_idx is not None:
        assert torch.equal(fast.g_idx, ref.g_idx)
    assert s_fast.dead_columns == s_ref.dead_columns == 1 and torch.all(fast.dequantize(torch.float32)[:, 11] == 0)
    assert s_fast.loss == pytest.approx(s_ref.loss, rel=1e-9)
    # and the case is not trivial: GPTQ moved codes away from RTN's
    rtn = quantize_int(W.float(), qtype, strategy="group" if kw["group_size"] else "channel",
                       group_size=kw["group_size"], symmetric=kw["symmetric"])
    assert (fast.codes != rtn.codes).float().mean() > 0.1


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_fast_loop_matches_the_reference_loop_in_float32(case):
    """What runs (float32): summation order may flip a code that sits on a rounding tie, nothing more."""
    kw = dict(LOOP_CASES[case])
    qtype = kw.pop("qtype", INT4)
    W, H = _loop_layer()
    fast, _ = gptq_quantize(W, H, qtype, **kw)
    ref, _ = gptq_quantize(W, H, qtype, reference=True, **kw)
    assert (fast.codes != ref.codes).float().mean() < 0.01
    e_fast = output_error(W, fast.dequantize(torch.float32), H)
    e_ref = output_error(W, ref.dequantize(torch.float32), H)
    assert e_fast == pytest.approx(e_ref, rel=0.01)


def test_method_factors_a_shared_hessian_once(monkeypatch):
    """q/k/v get equal Hessians (distinct tensors) from the engine: one factorisation serves all
    three, with the very result of factoring each; a different H is factored anew."""
    from qtool.methods import gptq

    calls = []
    real = gptq.factor_hessian
    monkeypatch.setattr(gptq, "factor_hessian", lambda H, *a, **k: calls.append(H) or real(H, *a, **k))
    W, H = random_layer(24, 64, seed=8)
    W2, H2 = random_layer(24, 64, seed=9)
    m = METHODS.get("gptq")(act_order=True)
    spec = LayerSpec("x.weight", INT4, "group", 16, False)
    got = [m.quantize_with_stats(w, spec, h)[0] for w, h in ((W, H.clone()), (W2, H.clone()), (W, H2), (W, H2.clone()))]
    assert len(calls) == 2
    for (w, h), qw in zip(((W, H), (W2, H), (W, H2), (W, H2)), got):
        want, _ = gptq_quantize(w, h, INT4, group_size=16, symmetric=False, params=GPTQParams(act_order=True, group_aware=False))
        assert torch.equal(qw.codes, want.codes) and torch.equal(qw.scale, want.scale) and torch.equal(qw.g_idx, want.g_idx)


@pytest.mark.parametrize("group_size", [32, 40])
def test_act_order_g_idx_maps_every_column_to_its_group(group_size):
    W, H = random_layer(16, 96, seed=4)
    qw, _ = gptq_quantize(W, H, INT4, group_size=group_size, symmetric=True, params=GPTQParams(act_order=True, group_aware=False))
    n_groups = -(-96 // group_size)
    assert qw.g_idx is not None and qw.g_idx.shape == (96,) and qw.g_idx.dtype == torch.int32
    counts = torch.bincount(qw.g_idx.long(), minlength=n_groups)
    assert counts[:-1].eq(group_size).all() and counts[-1] == 96 - group_size * (n_groups - 1)
    # the groups follow decreasing diag(H): group 0 holds the highest-energy columns
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(96) // group_size)
    # dequantize() honours g_idx: the result is close to W
    assert torch.nn.functional.cosine_similarity(qw.dequantize(torch.float32).flatten(), W.flatten(), dim=0) > 0.95
    static, _ = gptq_quantize(W, H, INT4, group_size=group_size, symmetric=True, params=GPTQParams(act_order=True, static_groups=True, group_aware=False))
    assert static.g_idx is None  # static groups stay contiguous: no map needed


def test_dead_columns_and_a_singular_hessian_get_more_damping():
    W, H = random_layer(16, 64, seed=5)
    H[:, 7] = H[7, :] = 0  # an input that never fired
    X = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    singular = X.T @ X  # rank 8 of 64
    qw, stats = gptq_quantize(W, H, INT4, group_size=None, symmetric=True)
    assert stats.dead_columns == 1 and torch.all(qw.codes[:, 7] == 0)
    # rank 8 of 64, shifted so that its null space has eigenvalue -1e-4 x mean(diag): damping
    # 1e-6 and 1e-5 cannot factorise it, 1e-3 can (1e-4 is a float32 coin toss)
    bad = singular - 1e-4 * torch.diag(singular).mean() * torch.eye(64)
    qw, stats = gptq_quantize(W, bad, INT4, group_size=None, symmetric=True, params=GPTQParams(damp=1e-6))
    assert stats.retries in (2, 3) and stats.damp == pytest.approx(1e-6 * 10**stats.retries)
    assert torch.isfinite(qw.dequantize(torch.float32)).all()


def test_method_without_a_hessian_refuses_clearly():
    m = METHODS.get("gptq")()
    assert m.needs_calibration
    with pytest.raises(UsageError, match="calibration"):
        m.quantize(torch.randn(4, 8), LayerSpec("x.weight", INT4, "channel", None, True))
    with pytest.raises(UsageError, match="--damp"):
        METHODS.get("gptq")(damp=-1)


# -- end to end on a tiny llama -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """The tiny llama of tiny_models with a 257-token byte-level tokenizer saved beside it."""
    from tiny_models import build_tiny_with_byte_tokenizer

    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("gptq") / "tiny-llama")


@pytest.fixture(scope="module")
def texts(tmp_path_factory, wikitext_path) -> tuple[Path, str]:
    """Calibration file (first half of the shared WikiText sample, as qtool.calib uses it) and a
    held-out passage from its second half."""
    text = wikitext_path.read_text(encoding="utf-8")[:60_000]
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    held_out = wikitext_path.read_text(encoding="utf-8")[-4000:]
    return calib, held_out


@pytest.fixture(scope="module")
def runs(tiny_llama, texts, tmp_path_factory):
    from typer.testing import CliRunner

    from qtool.cli.main import app

    root = tmp_path_factory.mktemp("runs")

    def go(name: str, *args: str) -> tuple[Path, dict]:
        out = root / name
        res = CliRunner().invoke(app, ["quantize", str(tiny_llama), *args, "-o", str(out), "--json"])
        assert res.exit_code == 0, res.output
        return out, json.loads(res.stdout)

    calib = str(texts[0])
    common = ("-b", "4", "-g", "32")
    return {
        "gptq": go("gptq", "-m", "gptq", *common, "--dataset", calib, "--samples", "8", "--seq-len", "64"),
        "rtn": go("rtn", "-m", "rtn", *common),
        "gptq-ao": go("gptq-ao", "-m", "gptq", *common, "--act-order", "--static-groups",
                      "--dataset", calib, "--samples", "8", "--seq-len", "64"),
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def _reference_logits(model_dir: Path, out: Path, ids):
    from transformers import AutoModelForCausalLM

    from qtool.formats.compressed_tensors import read_dequantized

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = ref.load_state_dict(read_dequantized(out), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    return _logits(ref, ids)


def _held_out_ids(model_dir: Path, held_out: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(held_out, return_tensors="pt").input_ids[:, :192]


@pytest.mark.parametrize("run", ["gptq", "gptq-ao"])
def test_transformers_loads_gptq_output_and_predicts_our_logits(run, runs, tiny_llama, texts):
    from transformers import AutoModelForCausalLM

    out, report = runs[run]
    ids = _held_out_ids(tiny_llama, texts[1])
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    want = _reference_logits(tiny_llama, out, ids)
    # same weights, float32 both sides; only matmul summation order may differ
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    actorder = {g["weights"]["actorder"] for g in qcfg["config_groups"].values()}
    assert actorder == ({"weight"} if run == "gptq-ao" else {None})
    assert len(report["layers"]) == 14 and all(layer["gptq"]["damp"] == GPTQParams().damp for layer in report["layers"])
    shared = {layer["name"].rsplit(".", 2)[-2]: layer["gptq"]["shares_hessian_with"] for layer in report["layers"][:7]}
    assert shared["k_proj"] == shared["v_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert shared["up_proj"] == "model.layers.0.mlp.gate_proj.weight" and shared["o_proj"] is None
    assert report["calibration"]["samples"] == 8 and report["calibration"]["seq_len"] == 64
    assert json.loads((out / "qtool.json").read_text())["calibration"]["spec"].endswith("calib.txt")


def test_gptq_beats_rtn_on_held_out_text(runs, tiny_llama, texts):
    """KL(original || quantized) of next-token distributions on text calibration never saw."""
    from transformers import AutoModelForCausalLM

    ids = _held_out_ids(tiny_llama, texts[1])
    p = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), ids), -1)

    def kl(out: Path) -> float:
        q = torch.log_softmax(_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    k_gptq, k_rtn = kl(runs["gptq"][0]), kl(runs["rtn"][0])
    # a random tiny model is no language model, but its layers' inputs still have structure that
    # GPTQ exploits; measured 0.0033 vs 0.0188 (~0.17x) here. Asserting "lower" only, the claim made.
    assert k_gptq < k_rtn, (k_gptq, k_rtn)


def test_blocks_are_calibrated_sequentially(tiny_llama, texts, monkeypatch):
    """Block 1's Hessian comes from the *quantized* block 0's outputs (GPTQ's sequential mode): it
    equals the Hessian of a float model whose block-0 q_proj holds our 2-bit weight, and differs
    from the float model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.calib.data import load_calibration
    from qtool.engine import blockwise
    from qtool.model.resolve import open_source

    seen: list[torch.Tensor] = []
    real = blockwise.HessianCollector.hessian
    monkeypatch.setattr(blockwise.HessianCollector, "hessian", lambda self, n: seen.append(real(self, n)) or seen[-1])
    ids = load_calibration(str(texts[0]), AutoTokenizer.from_pretrained(tiny_llama), samples=2, seq_len=32).input_ids
    names = [f"model.layers.{b}.self_attn.q_proj.weight" for b in (0, 1)]
    with open_source(str(tiny_llama)) as src:
        specs = {n: LayerSpec(n, get_qtype("int2"), "channel", None, True) for n in names}
        items = list(blockwise.run_blockwise(src, specs, METHODS.get("gptq")(), ids))
    q0 = next(it.qw for it in items if getattr(it, "name", None) == names[0] and hasattr(it, "qw"))
    assert len(seen) == 2 and sum(hasattr(it, "qw") for it in items) == 2

    def hessians(model) -> list[torch.Tensor]:
        xs: list[list[torch.Tensor]] = [[], []]
        hooks = [model.model.layers[b].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a, b=b: xs[b].append(a[0].reshape(-1, a[0].shape[-1]))) for b in (0, 1)]
        with torch.no_grad():
            for row in ids:
                model(row.unsqueeze(0))
        for h in hooks:
            h.remove()
        return [2 / torch.cat(x).shape[0] * torch.cat(x).T @ torch.cat(x) for x in xs]

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    h_float = hessians(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(q0.dequantize(torch.float32))
    h_seq = hessians(model)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # float32 both sides, same modules: agreement to summation-order noise
    assert rel(seen[0], h_float[0]) < 1e-5
    assert rel(seen[1], h_seq[1]) < 1e-5
    # and a 2-bit q_proj moves block 1's inputs measurably (so the check above has teeth)
    assert rel(h_seq[1], h_float[1]) > 1e-3


def test_cli_refuses_bad_gptq_combinations(tiny_llama, tmp_path, cli):
    r = cli("quantize", tiny_llama, "-m", "gptq", "-b", "4", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--dataset" in r.output
    r = cli("quantize", tiny_llama, "-m", "rtn", "--damp", "0.1", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--damp" in r.output
    r = cli("quantize", tiny_llama, "-m", "gptq", "-g", "32", "--act-order", "--dataset", "x.txt", "-o", tmp_path / "x")
    assert r.exit_code == 3 and "--static-groups" in r.output
    assert not (tmp_path / "x").exists()
