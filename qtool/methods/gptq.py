"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022, arXiv:2210.17323), Algorithm 1.

Each linear layer's weight W [out, in] is quantized one input column at a time, in the order of
the Cholesky factor of the inverse Hessian of the layer-wise objective ||WX - ŴX||² (§3, "Optimal
Brain Quantization"), with H = 2/n Σ XᵀX accumulated over calibration inputs by the engine. After
each column is rounded, its error is spread over the columns not yet quantized (§4 step 3,
"Cholesky reformulation"); updates are applied lazily in blocks of `block_size` columns (§4 step 2,
"lazy batch-updates"). H is damped by `damp` · mean(diag H) (§4, "numerical stability").

Grid: the compressed-tensors affine grid of core/affine.py (`int_qparams`), so the codes stored are
the codes a loader's dequantizer expects. Group scales/zeros are computed when the column loop
reaches the group's first column, from the *error-updated* weights (the reference's default,
"dynamic groups"); `static_groups` computes them all up front from the original W instead.
Act-order (the reference's `--act-order`, "desc_act") quantizes columns by decreasing diag(H);
with dynamic groups a group is formed of consecutive columns *in that order*, so the group of
an original column j is g_idx[j] (returned on the QuantizedWeight). With static groups the
groups stay the contiguous original ones and no g_idx is needed (compressed-tensors calls this
`actorder: weight`).

Group-aware order (`group_aware`, GPTQModel's act_group_aware; Gafni et al., CVPRW 2025) visits
whole groups, by decreasing largest diag(H), columns inside each by decreasing diag(H): most of
act-order's gain where it comes from outlier channels, with the groups kept as the original
contiguous ones (no g_idx; every kernel runs it). Dynamic qparams are measured when a group's first
processed column is reached, on the group's updated columns.

Unlike the reference, a group that starts inside a lazy block and reaches past it is measured on
the fully updated weights (the pending block update is applied to the slice first), so the lazy
schedule is exactly equivalent to the column-by-column algorithm.

Two schedules of the column loop, one algorithm (see "Schedules" below): `_loop_reference` is
Algorithm 1 column by column, `_loop_fast` what runs. Layers fed the same input (q/k/v, gate/up)
share one Hessian; `GPTQMethod` factors it once for all of them (`factor_hessian`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from qtool.core.affine import int_qparams
from qtool.core.grouping import to_groups
from qtool.core.qweight import QuantizedWeight
from qtool.engine.distributed import current
from qtool.errors import NumericalError, UsageError
from qtool.methods import METHODS
from qtool.methods.base import AMP_HELP, BlockInputs, BlockMethod, BlockResult, LayerSpec, MethodParams, MethodProgress
from qtool.qtypes import QType

MAX_DAMP_RETRIES = 6  # damping x10 each time a factorisation fails: 0.05 (the default) -> 5e4 of mean(diag H)
SUB_BLOCK = 16  # columns per inner sub-block of the fast schedule (see _loop_fast); measured best of 8/16/32


@dataclass(frozen=True)
class GPTQParams(MethodParams):
    """The method's own parameters, validated at the boundary.

    Defaults chosen by the AWQ / GPTQ-defaults bench (tests/bench/awq_bench.py, results in
    tests/bench/results/results.md): damp 0.05 and group-aware order (GPTQModel's defaults) took
    SmolLM2 int4 g128 from perplexity 32.01 (damp 0.01, plain order) to 29.41, KLD 0.312 -> 0.239, and
    --mse on top to 27.09, KLD 0.182 (GPTQModel's defaults: 29.21, 0.238)."""

    damp: float = field(default=0.05, metadata={"help": "Damping, a fraction of mean(diag H) added to its diagonal."})
    block_size: int = field(default=128, metadata={"help": "Columns per lazy batch update."})
    act_order: bool = field(default=False, metadata={"help": "Quantize columns by decreasing activation energy (diag H)."})
    static_groups: bool = field(default=False, metadata={
        "help": "Group scales from the original weights, before error updates (keeps groups contiguous with --act-order)."})
    mse: bool = field(default=True, metadata={
        "help": "MSE-optimal clipping of each group's range (a shrink search, norm 2.4) instead of its min/max."})
    group_aware: bool = field(default=True, metadata={
        "help": "Group-aware reordering (GPTQModel's act_group_aware): columns by diag H inside each group, groups by "
                "their largest diag H; groups stay contiguous (no g_idx). Off when --act-order is given alone."})
    amp: bool = field(default=False, metadata={"help": AMP_HELP})
    # --act-order given alone turns the group-aware default off (qtool.methods.params.resolve)
    yields_to: ClassVar[dict] = {"act_order": ("group_aware", False)}

    def __post_init__(self) -> None:
        if not (0 < self.damp < 1e3):
            raise UsageError(f"--damp {self.damp}: expected a positive fraction of mean(diag H), e.g. 0.01")
        if self.block_size < 1:
            raise UsageError(f"--block-size {self.block_size}: must be >= 1")
        if self.act_order and self.group_aware:
            raise UsageError("--act-order and --group-aware: choose one column order")


@dataclass(frozen=True)
class GPTQStats:
    """What happened in one layer, for the run report."""

    damp: float  # damping actually used (fraction of mean diag H)
    retries: int  # how many times damping was raised x10
    dead_columns: int  # inputs that never fired (H_jj = 0): weight set to 0 there
    loss: float  # Σ (w - q)² / [H⁻¹]_jj² / 2, the OBQ objective the loop accumulates


@dataclass(frozen=True)
class HessianFactor:
    """What quantizing a layer needs from its Hessian alone (shared by layers fed the same input)."""

    dead: torch.Tensor  # [in] bool: inputs that never fired (H_jj = 0)
    perm: torch.Tensor  # [in] processing order of the columns (act-order: decreasing diag H)
    U: torch.Tensor  # upper Cholesky factor of (H[perm][:, perm] + λI)⁻¹
    damp: float
    retries: int


# -- pure functions ---------------------------------------------------------------------------------
def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹) with λ = damp · mean(diag H) (§4
    "Cholesky reformulation"); where a factorisation fails, damping is raised x10 (up to
    MAX_DAMP_RETRIES).

    One factorisation and one triangular inverse instead of the reference's three steps
    (`inverse_hessian_cholesky_reference`): with J the reversal permutation and JHJ = L Lᵀ,
    U = J L⁻¹ J, since (J L⁻¹ J)ᵀ (J L⁻¹ J) = J (L Lᵀ)⁻¹ J = H⁻¹ and J (lower) J is upper with the
    same positive diagonal, so it is *the* Cholesky factor."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hr = H.flip(0, 1)
    for retry in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**retry
        L, info = torch.linalg.cholesky_ex(Hr + d * mean_diag * eye)
        if info == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return U, d, retry
    raise NumericalError(f"Hessian not positive definite even with damping {d:g} x mean(diag H)")


def inverse_hessian_cholesky_reference(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """The same factor as the paper's reference code computes it: Cholesky of H + λI, its inverse,
    the upper Cholesky factor of that inverse (three O(n³) steps)."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**retry
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, d, retry
    raise NumericalError(f"Hessian not positive definite even with damping {d:g} x mean(diag H)")


def group_aware_perm(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering (Gafni, Karnieli, Hanani, CVPRW 2025; GPTQModel's act_group_aware):
    the processing order visits whole groups of `group_size` consecutive columns, groups by
    decreasing largest diag H, columns inside a group by decreasing diag H. A partial last group
    stays last, so that every group starts at a multiple of `group_size` in processing order."""
    n = diag.shape[0]
    full = n // group_size
    inside = torch.argsort(diag[: full * group_size].reshape(full, group_size), dim=1, descending=True, stable=True)
    starts = torch.arange(full, device=diag.device).unsqueeze(1) * group_size
    order = torch.argsort(diag[: full * group_size].reshape(full, group_size).amax(1), descending=True, stable=True)
    perm = (inside + starts)[order].reshape(-1)
    if full * group_size < n:
        tail = torch.arange(full * group_size, n, device=diag.device)
        perm = torch.cat([perm, tail[torch.argsort(diag[tail], descending=True, stable=True)]])
    return perm


def factor_hessian(H: torch.Tensor, params: GPTQParams = GPTQParams(), dtype: torch.dtype = torch.float32,
                   group_size: int | None = None) -> HessianFactor:
    """Dead inputs (H_jj = 0) get H_jj = 1, as in the reference (their weights are zeroed by the
    caller: those columns never see activations, so any value is optimal and zero is the cheapest);
    act-order or group-aware order permutes (`group_size`: the layer's, None per channel); then the
    damped inverse's Cholesky factor."""
    H = H.to(dtype, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if params.act_order or params.group_aware:
        if params.act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        else:
            perm = group_aware_perm(torch.diag(H), group_size or H.shape[0])
        H = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    U, damp, retries = inverse_hessian_cholesky(H, params.damp)
    return HessianFactor(dead, perm, U, damp, retries)


class _Grid:
    """Scales and zero points of every group: as stored ([out, G], scale_dtype / int8) and as the
    loop uses them ([G, out] in the compute dtype, one contiguous row per group)."""

    def __init__(self, out_f: int, n_groups: int, qtype: QType, symmetric: bool, scale_dtype: torch.dtype,
                 dtype: torch.dtype, device: torch.device, mse: bool = False) -> None:
        self.qtype, self.symmetric, self.scale_dtype, self.mse = qtype, symmetric, scale_dtype, mse
        self.scales = torch.ones(out_f, n_groups, dtype=scale_dtype, device=device)
        self.zeros = None if symmetric else torch.zeros(out_f, n_groups, dtype=torch.int8, device=device)
        self.s = torch.ones(n_groups, out_f, dtype=dtype, device=device)
        self.z = torch.zeros(n_groups, out_f, dtype=dtype, device=device)

    def set(self, groups: torch.Tensor, first: int) -> None:
        """groups [out, n, k] (a partial group zero-padded) -> the qparams of groups first..first+n-1."""
        if self.mse:
            from qtool.core.mse_grid import mse_qparams

            s, z = mse_qparams(groups, self.qtype, self.symmetric, self.scale_dtype)
        else:
            s, z = int_qparams(groups, self.qtype, self.symmetric, self.scale_dtype)  # [out, n]
        n = s.shape[1]
        self.scales[:, first : first + n] = s
        self.s[first : first + n] = s.t()  # exact: the stored scale, widened
        if z is not None:
            self.zeros[:, first : first + n] = z  # type: ignore[index]
            self.z[first : first + n] = z.t()


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    qtype: QType,
    *,
    group_size: int | None,
    symmetric: bool,
    params: GPTQParams = GPTQParams(),
    scale_dtype: torch.dtype | None = None,
    factor: HessianFactor | None = None,
    dtype: torch.dtype = torch.float32,
    reference: bool = False,
) -> tuple[QuantizedWeight, GPTQStats]:
    """Algorithm 1 of the paper. W [out, in] (any float dtype), H [in, in].
    group_size None = per-channel. Returns codes in the original column order.

    `factor`: `factor_hessian(H, params, dtype)` when the caller has it already (H is then unused).
    `dtype`: the compute dtype (float64 for tests); `reference`: run the column-by-column loop."""
    scale_dtype = scale_dtype or W.dtype
    out_f, cols = W.shape
    if factor is None:
        factor = factor_hessian(H, params, dtype, group_size)
    W = W.to(dtype, copy=True)
    W[:, factor.dead] = 0
    g = group_size or cols
    n_groups = -(-cols // g)
    grid = _Grid(out_f, n_groups, qtype, symmetric, scale_dtype, dtype, W.device, params.mse)
    static = group_size is None or params.static_groups
    if static:  # qparams from the original W, before any update (§4 / reference static_groups), all at once
        grid.set(to_groups(W, g), 0)
    perm = factor.perm
    reordered = params.act_order or params.group_aware
    if reordered:
        W = W[:, perm]
    # group of the column at processing position p: act-order's dynamic groups are consecutive in
    # processing order; group-aware order keeps the original groups (whole, at multiples of g)
    group_at = (perm // g if static or params.group_aware else torch.arange(cols) // g).tolist()
    dynamic = None if static else g
    U = factor.U.to(dtype)
    if reference:
        Q, loss = _loop_reference(W, U, grid, group_at, dynamic, qtype)
    else:
        Q, loss = _loop_fast(W, U, grid, group_at, dynamic, qtype, params.block_size)
    g_idx = None
    if reordered:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if params.act_order and not static:
            g_idx = (inv // g).to(torch.int32)  # g_idx[j] = group of original column j
    codes = Q.to(torch.int8).contiguous()
    strategy = "group" if group_size is not None else "channel"
    qw = QuantizedWeight(qtype, codes, grid.scales, grid.zeros, strategy, group_size, g_idx)
    return qw, GPTQStats(factor.damp, factor.retries, int(factor.dead.sum()), loss)


# -- Schedules --------------------------------------------------------------------------------------
# Both loops take W [out, in] already permuted to processing order, U the upper Cholesky factor of
# the damped inverse Hessian in that order, and return (codes as floats [out, in] in processing
# order, loss). Per column p of group k (scale s, zero z, d = U[p, p]):
#     q = clamp(round(w / s + z)),  err = (w - (q - z) · s) / d,  W[:, p:] -= err ⊗ U[p, p:]   (§4 eq. 3)
# A dynamic group's qparams are measured when column p = k·g is reached, on W[:, p:p+g] as the
# updates so far left it.
def _loop_reference(W, U, grid: _Grid, group_at: list[int], dynamic: int | None, qtype: QType):
    """Algorithm 1 column by column, each column's error applied at once to every later column."""
    W = W.clone()
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    loss = 0.0
    for p in range(cols):
        if dynamic and p % dynamic == 0:
            grid.set(W[:, p : p + dynamic].unsqueeze(1), group_at[p])
        s, z = grid.s[group_at[p]], grid.z[group_at[p]]
        w = W[:, p].clone()
        q = (w / s + z).round().clamp(qtype.qmin, qtype.qmax)
        err = (w - (q - z) * s) / U[p, p]
        W[:, p:] -= torch.outer(err, U[p, p:])
        Q[:, p] = q
        loss += float(err.double().square().sum()) / 2  # (w - deq)² / d² / 2
    return Q, loss


def _loop_fast(W, U, grid: _Grid, group_at: list[int], dynamic: int | None, qtype: QType, block_size: int):
    """The same arithmetic, scheduled for few tensor ops per column:

    * transposed, Wt [in, out]: a column is a contiguous row; the row views are made once;
    * errors kept unscaled, Δ_p = w - (q - z)·s, against V = U with each row r divided by U[r, r]:
      V[r, c]·Δ_r = err_r·U[r, c], so no division per column;
    * lazy blocks of `block_size` columns (§4 step 2): a block's Δ reach the columns after it by one
      matrix product when the block is done;
    * inside a block, sub-blocks of SUB_BLOCK columns (cut also where a dynamic group starts): a
      sub-block's Δ reach the rest of its block by one matrix product; inside a sub-block a column
      gathers the Δ of the columns before it by one matrix-vector product ("left-looking") instead
      of every column updating all later columns of its block;
    * no host syncs in the loop; Δ kept for every column, so the loss is summed once per layer.

    Per column that is 5 tensor ops on [out] vectors (6 asymmetric). Summation order differs from
    `_loop_reference`, so float32 codes can differ at rounding ties; in float64 they agree."""
    cols, out_f = W.shape[1], W.shape[0]
    Wt = W.t().contiguous()
    Qt = torch.empty_like(Wt)
    diag = U.diagonal()
    V = U / diag.unsqueeze(1)
    # Δ of every column; rows of columns not done yet must be 0: the left-looking products run over all rows
    D = torch.zeros_like(Wt)
    wrows, qrows, drows = Wt.unbind(0), Qt.unbind(0), D.unbind(0)
    srows, zrows = grid.s.unbind(0), grid.z.unbind(0)  # views: they see groups set later
    lo, hi = qtype.qmin, qtype.qmax
    sym = grid.symmetric
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Db = D[i1:i2]
        cuts = set(range(i1, i2, SUB_BLOCK))
        if dynamic:
            cuts.update(range(-(-i1 // dynamic) * dynamic, i2, dynamic))
        bounds = sorted(cuts) + [i2]
        for j1, j2 in zip(bounds, bounds[1:]):
            # here rows j1..i2-1 of Wt hold the errors of every column before j1; rows from i2 on
            # lack those of this block's columns i1..j1-1
            if dynamic and j1 % dynamic == 0:
                end = min(j1 + dynamic, cols)
                cur = Wt[j1 : min(end, i2)]
                if end > i2:
                    rest = torch.addmm(Wt[i2:end], V[i1:j1, i2:end].t(), Db[: j1 - i1], alpha=-1)
                    cur = torch.cat([cur, rest])
                grid.set(cur.t().contiguous().unsqueeze(1), group_at[j1])  # [out, 1, k]: reduce along rows
            Ds = Db[j1 - i1 : j2 - i1]
            DsT = Ds.t()
            vcols = V[j1:j2, j1:j2].t().contiguous().unbind(0)  # vcols[j][r] = V[j1 + r, j1 + j], 0 for r > j
            for p in range(j1, j2):
                k = group_at[p]
                s, q, dp = srows[k], qrows[p], drows[p]
                # the column with the errors of this sub-block's earlier columns (Δ rows from p on are 0)
                w = torch.addmv(wrows[p], DsT, vcols[p - j1], alpha=-1) if p > j1 else wrows[p]
                if sym:
                    torch.div(w, s, out=q).round_().clamp_(lo, hi)
                    torch.addcmul(w, q, s, value=-1, out=dp)
                else:
                    z = zrows[k]
                    torch.addcdiv(z, w, s, out=q).round_().clamp_(lo, hi)  # w / s + z, as core/affine rounds
                    torch.addcmul(w, q - z, s, value=-1, out=dp)
            if j2 < i2:
                Wt[j2:i2].addmm_(V[j1:j2, j2:i2].t(), Ds, alpha=-1)
        if i2 < cols:
            Wt[i2:].addmm_(V[i1:i2, i2:].t(), Db, alpha=-1)  # lazy batch update of the columns after the block
    loss = float((D.double().square().sum(1) / diag.double().square()).sum()) / 2  # Σ err² / 2, err = Δ / d
    return Qt.t(), loss


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the layer-wise objective ‖WX - ŴX‖² up to the 2/n factor of H."""
    D = (W.float() - W_hat.float())
    return float(torch.einsum("oi,ij,oj->", D, H.float(), D))


# -- split over processes ---------------------------------------------------------------------------
MIN_CHUNK_ROWS = 64  # rows below which a linear is not cut further (the column loop's fixed cost per chunk)


def row_chunks(shapes: list[tuple[int, int]], world: int) -> list[tuple[int, int, int]]:
    """(linear index, first row, end row) chunks of a group's linears for `world` ranks: each linear
    cut into ceil(its cost / a rank's share of the group's) equal runs of rows (cost out x in²), at
    most `world`, none under MIN_CHUNK_ROWS rows: q/k/v on 2 ranks gives q halved, k and v whole; a
    lone linear (o, down) is cut in `world`. Each chunk pays the column loop's fixed cost again, so
    small linears stay whole."""
    costs = [o * i * i for o, i in shapes]
    per_rank = sum(costs) / world
    out = []
    for k, ((rows, _), c) in enumerate(zip(shapes, costs)):
        n = max(1, min(world, math.ceil(c / per_rank - 1e-9) if per_rank else 1, rows // MIN_CHUNK_ROWS))
        bounds = [rows * j // n for j in range(n + 1)]
        out += [(k, a, b) for a, b in zip(bounds, bounds[1:])]
    return out


def merge_rows(parts: list[tuple[QuantizedWeight, dict]]) -> tuple[QuantizedWeight, dict]:
    """Row chunks of one linear's solve (in row order) -> the whole linear's: codes, scales and zero
    points stacked; g_idx and the factor's figures are the chunks' common ones; the losses add up."""
    from dataclasses import replace

    if len(parts) == 1:
        return parts[0]
    qws = [q for q, _ in parts]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    qw = replace(qws[0], codes=cat([q.codes for q in qws]), scale=cat([q.scale for q in qws]),
                 zero_point=cat([q.zero_point for q in qws]))
    st = dict(parts[0][1])
    st["loss"] = sum(s["loss"] for _, s in parts)
    return qw, st


# -- the method -------------------------------------------------------------------------------------
@METHODS.register("gptq")
class GPTQMethod(BlockMethod):
    """GPTQ (Frantar et al. 2022): second-order error compensation from calibration Hessians."""

    params = GPTQParams
    needs_calibration = True
    supported_kinds = ("int",)
    uses_stats = ("xtx",)  # --stats: Hessians per layer (pipeline._stream, not block-level)
    true_sequential = True  # see engine/blockwise.py: groups see their quantized predecessors

    def __init__(self, **params: object) -> None:
        from qtool.methods.params import with_yields

        self.params = GPTQParams(**with_yields(GPTQParams, params))  # type: ignore[arg-type]
        self._last: tuple[torch.Tensor, int | None, HessianFactor] | None = None  # (H, group size, its factor)

    def _factor(self, H: torch.Tensor, group_size: int | None = None) -> HessianFactor:
        """factor_hessian, reused while consecutive layers bring an equal H (q/k/v, gate/up share
        their input, so the engine hands each of them the same Hessian) and, where the order
        depends on it (group-aware), the same group size."""
        g = group_size if self.params.group_aware else None
        if self._last is not None:
            last_H, last_g, f = self._last
            if last_g == g and last_H.shape == H.shape and last_H.dtype == H.dtype and torch.equal(last_H, H):
                return f
        self._last = None
        f = factor_hessian(H, self.params, group_size=g)
        self._last = (H, g, f)
        return f

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        raise UsageError(
            f"{spec.name}: gptq needs calibration data (a Hessian per layer); "
            "use quantize_with_stats(w, spec, H), or `qtool quantize -m gptq --dataset ...`"
        )

    def quantize_with_stats(self, w: torch.Tensor, spec: LayerSpec, H: torch.Tensor) -> tuple[QuantizedWeight, GPTQStats]:
        if not spec.qtype.is_int:
            raise UsageError(f"{spec.name}: gptq produces integer weights, not {spec.qtype.name}")
        if spec.strategy not in ("channel", "group"):
            raise UsageError(f"{spec.name}: gptq supports per-channel or grouped scales, not {spec.strategy!r}")
        group = spec.group_size if spec.strategy == "group" else None
        try:
            return gptq_quantize(w, H, spec.qtype, group_size=group, symmetric=spec.symmetric, params=self.params,
                                 scale_dtype=spec.scale_dtype, factor=self._factor(H, group))
        except NumericalError as e:
            raise NumericalError(f"{spec.name}: {e}") from None

    def _solve_group(self, block, group: list[str], specs: dict[str, LayerSpec], collector, comm) -> dict:
        """{linear: (QuantizedWeight, stats)} for a group whose Hessians are final. Over several
        processes every rank holds the same all-reduced Hessians, and GPTQ's rows are independent
        given the Hessian's factor, so the solves are split by rows: each linear's rows are cut into
        chunks (`row_chunks`), each rank solves its chunks, and the results are exchanged and put
        back together. A row's codes do not depend on the rows solved beside it (the same bytes as
        one process at the same threads per process: tests/test_distributed.py)."""
        weights = {m: block.get_submodule(m).weight.detach() for m in group}
        if not comm.active:
            return {m: self._solve(weights[m], specs[m], collector.hessian(m)) for m in group}
        from qtool.engine.block_engine import _on_cpu

        chunks = row_chunks([tuple(weights[m].shape) for m in group], comm.world)
        owner = comm.assign([float(r1 - r0) * weights[group[i]].shape[1] ** 2 for i, r0, r1 in chunks])
        mine = {}
        for (i, r0, r1), r in zip(chunks, owner):
            if r == comm.rank:
                m = group[i]
                qw, st = self._solve(weights[m][r0:r1], specs[m], collector.hessian(m))
                mine[(i, r0)] = (_on_cpu(qw), st)
        comm.solved[0] += sum(r1 - r0 for (i, r0, r1), r in zip(chunks, owner) if r == comm.rank)
        comm.solved[1] += sum(w.shape[0] for w in weights.values())
        parts = {}
        for d in comm.all_gather_object(mine, what="the exchange of a group's GPTQ solves"):
            parts.update(d)
        return {m: merge_rows([parts[(j, r0)] for j, r0, _ in chunks if j == i]) for i, m in enumerate(group)}

    def _solve(self, w: torch.Tensor, spec: LayerSpec, H: torch.Tensor) -> tuple[QuantizedWeight, dict]:
        qw, st = self.quantize_with_stats(w, spec, H)  # w: float32 copy of the checkpoint's values (exact)
        return qw, asdict(st)

    def quantize_block(self, block, inputs: BlockInputs, specs: dict[str, LayerSpec], targets, progress: MethodProgress) -> BlockResult:
        """One block, true-sequential (engine/blockwise.py's docstring): per input group, the
        Hessians from a pass in which the groups before it hold their quantized weights."""
        from qtool.engine.block_engine import input_groups
        from qtool.engine.blockwise import group_hessians
        from qtool.errors import UnsupportedError

        groups, owners = input_groups(block, inputs, list(specs)) if self.true_sequential else ([list(specs)], None)
        comm = current()
        result = BlockResult({})
        for gi, group in enumerate(groups):
            progress(gi, len(groups), group[0])
            last = group[-1] if self.true_sequential and len(groups) > 1 else None
            collector = group_hessians(block, inputs, group, last, owners)
            for m, (qw, st) in self._solve_group(block, group, specs, collector, comm).items():
                with torch.no_grad():
                    block.get_submodule(m).weight.copy_(qw.dequantize(torch.float32))
                result.quantized[m], result.stats[m] = qw, st
                result.shares[m] = collector.owner[m]
            del collector
            if self.true_sequential:  # final now, and fed only by groups before it: later passes reuse its outputs
                inputs.freeze(block, group)
        progress(len(groups), len(groups), "")
        return result
