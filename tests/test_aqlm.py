"""`-m aqlm` (qtool/methods/aqlm.py, core/codebook.py): the code search against brute force, the
rounds never losing ground, NaN rounds reverted, the bad-input refusals, and the point of the method:
at no more bits per weight than RTN 2-bit g64, a far smaller layer output error ||(W − Ŵ)X||²."""

from __future__ import annotations

import itertools

import pytest
import torch

from qtool.core.codebook import CodebookWeight, kmeans, reconstruct
from qtool.errors import UsageError
from qtool.methods.aqlm import AQLMParams, aqlm_quantize, code_sweep, search_group
from qtool.methods.base import LayerSpec
from qtool.methods.rtn import RTNMethod
from qtool.qtypes import get_qtype


def layer(out: int, cols: int, seed: int = 0, tokens: int = 2048):
    """A seeded weight and the Hessian of inputs with LLM-like uneven channel energies (log-normal)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.02
    X = torch.randn(tokens, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    return W, X.T @ X / tokens


def output_error(W, W_hat, H) -> float:
    E = W - W_hat.float()
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def test_aqlm_2x8_beats_rtn_2bit_at_no_more_bits():
    W, H = layer(256, 1024)
    qw, st = aqlm_quantize(W, H, AQLMParams(codebooks=2, codebook_bits=8), seed=0)
    rtn = RTNMethod().quantize(W, LayerSpec("x.weight", get_qtype("int2"), "group", 64, False, torch.float16))
    aqlm_bpw, rtn_bpw = qw.storage_bits() / W.numel(), rtn.storage_bits() / W.numel()
    assert aqlm_bpw <= rtn_bpw  # 2.27 vs 2.28: codes + fp16 codebooks + fp16 scales vs codes + fp16 scales + int2 zeros
    e_aqlm, e_rtn = output_error(W, qw.dequantize(torch.float32), H), output_error(W, rtn.dequantize(torch.float32), H)
    assert e_aqlm < e_rtn / 4, (e_aqlm, e_rtn)  # measured ~0.02 vs ~0.21
    assert st.rel_error < st.rel_error_init  # the rounds improved on the k-means start
    assert qw.codebooks.dtype == torch.float16 and qw.scales.dtype == torch.float16  # what is stored, reported


def test_deterministic_given_the_seed():
    W, H = layer(32, 64)
    p = AQLMParams(codebooks=2, codebook_bits=6, steps=2, codebook_steps=5)
    a, _ = aqlm_quantize(W, H, p, seed=3)
    b, _ = aqlm_quantize(W, H, p, seed=3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)


def _f(v, Hjj, b):
    return (v @ Hjj * v).sum(-1) - 2 * (v * b).sum(-1)


@pytest.mark.parametrize("M, beam", [(1, 1), (2, 16)])
def test_group_search_finds_the_brute_force_optimum(M, beam):
    """M = 1: the best single vector; M = 2 with a beam as wide as a codebook: the best pair."""
    g = torch.Generator().manual_seed(1)
    K, d, rows = 16, 4, 12
    books = torch.randn(M, K, d, generator=g)
    A = torch.randn(d, d, generator=g)
    Hjj = A @ A.T + 0.1 * torch.eye(d)
    b, s = torch.randn(rows, d, generator=g), torch.rand(rows, generator=g) + 0.5
    sq = torch.einsum("mkd,de,mke->mk", books, Hjj, books)
    start = torch.zeros(rows, M, dtype=torch.int32)
    got = search_group(b, Hjj, start, books, s, sq, beam)
    for r in range(rows):
        best = min(itertools.product(range(K), repeat=M),
                   key=lambda c: float(_f(s[r] * sum(books[m][c[m]] for m in range(M)), Hjj, b[r])))
        v_best = s[r] * sum(books[m][best[m]] for m in range(M))
        v_got = s[r] * sum(books[m][int(got[r, m])] for m in range(M))
        assert float(_f(v_got, Hjj, b[r])) <= float(_f(v_best, Hjj, b[r])) + 1e-5


def test_code_sweep_never_increases_the_output_error():
    W, H = layer(48, 64, seed=2)
    g = torch.Generator().manual_seed(0)
    books = torch.randn(2, 32, 8, generator=g)
    s = W.pow(2).mean(1).sqrt() / 2
    codes = torch.randint(0, 32, (48, 8, 2), generator=g, dtype=torch.int32)
    errs = [output_error(W, reconstruct(codes, books, s), H)]
    for beam in (1, 4, 4):
        codes = code_sweep(W, H, codes, books, s, beam)
        errs.append(output_error(W, reconstruct(codes, books, s), H))
    assert all(b <= a + 1e-7 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0] / 2


def test_kmeans_with_more_centroids_than_points_reproduces_them():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    c, a = kmeans(x, 64, 3, torch.Generator().manual_seed(0))
    assert c.shape == (64, 8) and torch.allclose(c[a], x)


def test_nan_in_a_codebook_update_reverts_the_round(monkeypatch):
    W, H = layer(32, 64)

    class PoisonedAdam(torch.optim.Adam):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0, 0] = float("nan")

    monkeypatch.setattr(torch.optim, "Adam", PoisonedAdam)
    qw, st = aqlm_quantize(W, H, AQLMParams(codebooks=2, codebook_bits=6, steps=2, tolerance=0.0, codebook_steps=3), seed=0)
    assert st.reverted == 2 and torch.isfinite(qw.dequantize(torch.float32)).all()
    assert st.rel_error < st.rel_error_init  # the code sweeps still count


def test_codebook_weight_dequantizes_as_documented():
    codes = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.int32)  # one row, two groups of 2 columns, M = 2
    books = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]], dtype=torch.float16)
    qw = CodebookWeight(codes, books, torch.tensor([0.5], dtype=torch.float16), 2, 1)
    assert qw.dequantize(torch.float32).tolist() == [[(3 + 10) / 2, (4 + 20) / 2, (1 + 30) / 2, (2 + 40) / 2]]
    assert qw.storage_bits() == 4 * 1 + 8 * 16 + 16 and qw.shape == (1, 4) and qw.scheme == "2x1"


@pytest.mark.parametrize("kwargs, words", [
    ({"codebooks": 0}, "--codebooks 0"),
    ({"codebook_bits": 17}, "--codebook-bits 17"),
    ({"beam": 0}, "--beam 0"),
    ({"tolerance": 1.5}, "--tolerance 1.5"),
    ({"codebooks": 8, "codebook_bits": 16, "in_group": 4096}, "GiB per layer"),  # ~48 GiB of codebook state, estimated up front
])
def test_bad_parameters_are_named(kwargs, words):
    with pytest.raises(UsageError, match=words.replace("-", r"\-")):
        AQLMParams(**kwargs)
