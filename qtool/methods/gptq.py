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

Unlike the reference, a group that starts inside a lazy block and reaches past it is measured on
the fully updated weights (the pending block update is applied to the slice first), so the lazy
schedule is exactly equivalent to the column-by-column algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.affine import int_qparams
from qtool.core.qweight import QuantizedWeight
from qtool.errors import NumericalError, UsageError
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec, QuantMethod
from qtool.qtypes import QType

MAX_DAMP_RETRIES = 6  # damping x10 each time a factorisation fails: 1e-2 -> 1e4 of mean(diag H)


@dataclass(frozen=True)
class GPTQParams:
    """The method's own parameters, validated at the boundary."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (reference: percdamp)
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.damp < 1e3):
            raise UsageError(f"--damp {self.damp}: expected a positive fraction of mean(diag H), e.g. 0.01")
        if self.block_size < 1:
            raise UsageError(f"--block-size {self.block_size}: must be >= 1")


@dataclass(frozen=True)
class GPTQStats:
    """What happened in one layer, for the run report."""

    damp: float  # damping actually used (fraction of mean diag H)
    retries: int  # how many times damping was raised x10
    dead_columns: int  # inputs that never fired (H_jj = 0): weight set to 0 there
    loss: float  # Σ (w - q)² / [H⁻¹]_jj² / 2, the OBQ objective the loop accumulates


# -- pure functions ---------------------------------------------------------------------------------
def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0, as in the reference: those columns
    never see activations, so any value is optimal and zero is the cheapest."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W = W.clone()
    W[:, dead] = 0
    return W, H, int(dead.sum())


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H) (§4 "Cholesky
    reformulation"); where a factorisation fails, damping is raised x10 (up to MAX_DAMP_RETRIES)."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**retry
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, d, retry
    raise NumericalError(f"Hessian not positive definite even with damping {d:g} x mean(diag H)")


def _qparams(cols: torch.Tensor, qtype: QType, symmetric: bool, scale_dtype: torch.dtype):
    """[out, k] -> scale [out], zero [out] float32 (0 when symmetric), scale stored [out] in scale_dtype."""
    s, z = int_qparams(cols.unsqueeze(1), qtype, symmetric, scale_dtype)  # [out, 1]
    z_f = z[:, 0].float() if z is not None else torch.zeros_like(s[:, 0], dtype=torch.float32)
    return s[:, 0], (None if z is None else z[:, 0]), z_f


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qtype: QType) -> torch.Tensor:
    """One column w [out] -> codes [out] float (same op order as core/affine.quantize_int)."""
    return (w / s + z).round_().clamp_(qtype.qmin, qtype.qmax)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    qtype: QType,
    *,
    group_size: int | None,
    symmetric: bool,
    params: GPTQParams = GPTQParams(),
    scale_dtype: torch.dtype | None = None,
) -> tuple[QuantizedWeight, GPTQStats]:
    """Algorithm 1 of the paper. W [out, in] (any float dtype), H [in, in] float32.
    group_size None = per-channel. Returns codes in the original column order."""
    scale_dtype = scale_dtype or W.dtype
    out_f, cols = W.shape
    W, H, n_dead = prepare_hessian(W.to(torch.float32), H.to(torch.float32))
    g = group_size or cols
    n_groups = -(-cols // g)
    scales = torch.empty(out_f, n_groups, dtype=scale_dtype, device=W.device)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.int8, device=W.device)
    zf = torch.zeros(out_f, n_groups, dtype=torch.float32, device=W.device)

    def set_group(k: int, cols_now: torch.Tensor) -> None:
        s, z, z_f = _qparams(cols_now, qtype, symmetric, scale_dtype)
        scales[:, k], zf[:, k] = s, z_f
        if z is not None:
            zeros[:, k] = z

    static = group_size is None or params.static_groups
    if static:  # qparams from the original W, before any update (§4 / reference static_groups)
        for k in range(n_groups):
            set_group(k, W[:, k * g : (k + 1) * g])

    perm = torch.argsort(torch.diag(H), descending=True) if params.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    # group of the column at permuted position p: dynamic groups are consecutive in processing order
    group_at = perm // g if static else torch.arange(cols, device=W.device) // g
    Hinv, damp_used, retries = inverse_hessian_cholesky(H, params.damp)

    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64)
    bs = params.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            if not static and p % g == 0:  # a dynamic group starts: measure its (updated) columns
                end = min(p + g, cols)
                cur = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the part past this block still owes it the pending update
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:p, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                set_group(p // g, cur)
            k = int(group_at[p])
            w, d = W1[:, i], Hinv1[i, i]
            s = scales[:, k].float()
            q = _round(w, s, zf[:, k], qtype)
            Q[:, p] = q
            deq = (q - zf[:, k]) * s
            err = (w - deq) / d
            loss += ((w - deq) ** 2).sum().double() / d.double() ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # §4 eq. (3), inside the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after the block

    inv = torch.argsort(perm)
    codes = Q[:, inv].to(torch.int8)
    g_idx = None
    if params.act_order and not static:
        g_idx = group_at[inv].to(torch.int32)  # g_idx[j] = group of original column j
    strategy = "group" if group_size is not None else "channel"
    qw = QuantizedWeight(qtype, codes, scales, None if symmetric else zeros, strategy, group_size, g_idx)
    return qw, GPTQStats(damp_used, retries, n_dead, float(loss))


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the layer-wise objective ‖WX - ŴX‖² up to the 2/n factor of H."""
    D = (W.float() - W_hat.float())
    return float(torch.einsum("oi,ij,oj->", D, H.float(), D))


# -- the method -------------------------------------------------------------------------------------
@METHODS.register("gptq")
class GPTQMethod(QuantMethod):
    """GPTQ (Frantar et al. 2022): second-order error compensation from calibration Hessians."""

    needs_calibration = True
    supported_kinds = ("int",)

    def __init__(self, **params: object) -> None:
        self.params = GPTQParams(**params)  # type: ignore[arg-type]

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
            return gptq_quantize(w, H, spec.qtype, group_size=group, symmetric=spec.symmetric, params=self.params)
        except NumericalError as e:
            raise NumericalError(f"{spec.name}: {e}") from None
