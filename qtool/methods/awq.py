"""AWQ: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration" (MLSys 2024, arXiv:2306.00978).

Per decoder block (qtool/engine/block_engine.py), per group of linears fed one input x:
  1. statistics of x on the calibration inputs (the outputs of the already-quantized blocks, on the
     float block): G = Σ xᵀx / tokens and the per-channel mean |x| (or both from `--stats`);
  2. scale search (§3.2 "searching to scale"): for α on a grid of `alpha_grid` points in [0, 1),
     s = mean|x|^α (with `duo_scaling`: / mean|w|^(1-α)), normalised by sqrt(max s · min s);
     loss(α) = Σ over the group's linears of ‖x Wᵀ - x (Q(W·diag s)·diag(1/s))ᵀ‖² / tokens, computed
     exactly from G as tr(D G Dᵀ) with D = W - Q(W s)/s (no pass over the tokens per α); α = 0 is
     plain round-to-nearest, so the search never does worse than RTN on this loss;
  3. fold (awq_fold.py): W·diag(s) into the linears and 1/s into the preceding norm or linear that
     the module graph shows produces x (verified numerically); a group without one keeps s = 1
     ("clipping only", reported);
  4. clipping search (the reference's "auto_clip"): per output row and group, the grid range is
     shrunk by r in 1, 1 - m/n, ..., 1 - m(n-1)/n (m = `max_shrink`, n = `clip_grid`), keeping the r
     whose group output error d G_gg dᵀ (d = w - Q(clamp(w))) is least (G_gg: the Gram block of the
     group's input columns, in the scaled coordinates);
  5. round-to-nearest of the clipped, scaled weights on the recipe's grid (core/affine.py):
     asymmetric (zero points) by default, symmetric on request.

All searches of a block run on its float weights; the folds are applied together afterwards, then
clipping and rounding (as the reference implementation orders them). The loss in step 2 is the
group's linear outputs, not the attention/MLP output the reference measures: it needs no knowledge
of which modules wrap the linears, and is what `--stats` can give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qtool.core.affine import int_qparams, quantize_int
from qtool.core.grouping import to_groups
from qtool.core.qweight import QuantizedWeight
from qtool.errors import NumericalError, UsageError
from qtool.methods import METHODS
from qtool.methods.awq_fold import Fold, discover_folds
from qtool.methods.base import BlockInputs, BlockMethod, BlockResult, LayerSpec, MethodParams, MethodProgress


@dataclass(frozen=True)
class AWQParams(MethodParams):
    alpha_grid: int = field(default=20, metadata={"help": "Points of the scale exponent grid α = 0, 1/n, ..., (n-1)/n."})
    duo_scaling: bool = field(default=False, metadata={"help": "Scales mean|x|^α / mean|w|^(1-α) instead of mean|x|^α."})
    clip: bool = field(default=True, metadata={"help": "Search each group's clipping range after scaling."})
    clip_grid: int = field(default=20, metadata={"help": "Shrink ratios tried by the clipping search."})
    max_shrink: float = field(default=0.5, metadata={"help": "Largest fraction of a group's range the clipping search may cut."})

    def __post_init__(self) -> None:
        if not 1 <= self.alpha_grid <= 1000:
            raise UsageError(f"--alpha-grid {self.alpha_grid}: expected 1..1000 points")
        if not 1 <= self.clip_grid <= 1000:
            raise UsageError(f"--clip-grid {self.clip_grid}: expected 1..1000 ratios")
        if not 0 <= self.max_shrink < 1:
            raise UsageError(f"--max-shrink {self.max_shrink}: expected a fraction in [0, 1)")


# -- pure functions ---------------------------------------------------------------------------------
def fake_quant(w: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Round-to-nearest on the spec's grid, dequantized (float32)."""
    return _rtn(w, spec).dequantize(torch.float32)


def _rtn(w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
    return quantize_int(w, spec.qtype, strategy=spec.strategy, group_size=spec.group_size, symmetric=spec.symmetric,
                        scale_dtype=spec.scale_dtype or torch.float32)


def output_loss(D: torch.Tensor, G: torch.Tensor) -> float:
    """tr(D G Dᵀ): Σ over tokens of ‖x Dᵀ‖², per token (G = Σ xᵀx / tokens)."""
    return float(((D @ G) * D).sum())


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid: int):
    """(α, s) for α = i / grid, s normalised so that max(s) · min(s) = 1."""
    x = x_mean.clamp(min=1e-4)
    for i in range(grid):
        a = i / grid
        s = x.pow(a) if w_mean is None else x.pow(a) / w_mean.clamp(min=1e-4).pow(1 - a)
        s = s.clamp(min=1e-4)
        yield a, s / (s.max() * s.min()).sqrt()


def search_scale(weights: list[torch.Tensor], specs: list[LayerSpec], G: torch.Tensor, x_mean: torch.Tensor,
                 grid: int, duo: bool, on_step=lambda i: None) -> tuple[float, torch.Tensor, float, float]:
    """-> (best α, its s, its loss, the loss at α = 0) of a group fed one input; losses as output_loss sums."""
    w_mean = None
    if duo:
        W = torch.cat(weights)
        w_mean = (W.abs() / W.abs().amax(1, keepdim=True).clamp(min=1e-12)).mean(0)
    best = (math.inf, 0.0, torch.ones_like(x_mean))
    rtn = math.nan
    for i, (a, s) in enumerate(scale_candidates(x_mean, w_mean, grid)):
        loss = sum(output_loss(w - fake_quant(w * s, sp) / s, G) for w, sp in zip(weights, specs))
        if not math.isfinite(loss):
            raise NumericalError(f"NaN/Inf in the AWQ scale search loss (α = {a:g})")
        if i == 0:
            rtn = loss
        if loss < best[0]:
            best = (loss, a, s)
        on_step(i)
    return best[1], best[2], best[0], rtn


def _grid_view(w: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """[out, in] -> [out, n_groups, k], as core/affine groups it (partial last group zero-padded)."""
    return to_groups(w, spec.group_size) if spec.strategy == "group" else w.unsqueeze(1)


def gram_blocks(G: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """G [in, in] -> its diagonal blocks per group [n_groups, k, k], zero-padded like the weights."""
    n = G.shape[0]
    k = spec.group_size if spec.strategy == "group" else n
    pad = (-n) % k
    Gp = torch.nn.functional.pad(G, (0, pad, 0, pad))
    idx = torch.arange(0, n + pad, k)
    return torch.stack([Gp[i : i + k, i : i + k] for i in idx.tolist()])


def _dequant_groups(g: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """RTN of grouped weights [out, n, k] and back: the arithmetic of core/affine.quantize_int."""
    s, z = int_qparams(g, spec.qtype, spec.symmetric, spec.scale_dtype or torch.float32)
    s = s.float().unsqueeze(-1)
    q = g / s
    if z is not None:
        zf = z.float().unsqueeze(-1)
        return ((q + zf).round().clamp(spec.qtype.qmin, spec.qtype.qmax) - zf) * s
    return q.round().clamp(spec.qtype.qmin, spec.qtype.qmax) * s


def search_clip(w: torch.Tensor, spec: LayerSpec, G: torch.Tensor, grid: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (w clamped to the best range of each (row, group), the chosen ratio per (row, group))."""
    g = _grid_view(w, spec)
    Gb = gram_blocks(G, spec)  # [n, k, k]
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    best_err = torch.full(g.shape[:2], math.inf, device=w.device)
    best_r = torch.ones(g.shape[:2], device=w.device)
    for i in range(grid):
        r = 1 - max_shrink * i / grid
        c = torch.maximum(torch.minimum(g, hi * r), lo * r)
        d = (g - _dequant_groups(c, spec)).transpose(0, 1)  # [n, out, k]
        err = (torch.bmm(d, Gb) * d).sum(-1).t()  # [out, n]: d G_gg dᵀ per (row, group)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    r = best_r.unsqueeze(-1)
    c = torch.maximum(torch.minimum(g, hi * r), lo * r)
    return c.reshape(w.shape[0], -1)[:, : w.shape[1]].contiguous(), best_r


# -- the method -------------------------------------------------------------------------------------
@METHODS.register("awq")
class AWQMethod(BlockMethod):
    """AWQ (Lin et al. 2024): activation-aware per-channel scales folded into the preceding norm or linear, then clipping."""

    params = AWQParams
    default_symmetric = False
    uses_stats = ("xtx", "sum_abs")

    def __init__(self, **params: object) -> None:
        self.params = AWQParams(**params)  # type: ignore[arg-type]

    def group_statistics(self, block, inputs: BlockInputs, groups: list[list[str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{group's first linear: (G = Σ xᵀx / tokens, mean |x|)} from the calibration inputs or `--stats`."""
        if inputs.stats is not None:
            st = inputs.stats
            out = {}
            for g in groups:
                full = f"{inputs.prefix}.{g[0]}"
                n = st.tokens(full)
                out[g[0]] = ((st.hessian(full) / 2).to(inputs.device), (st.vector(full, "sum_abs") / n).to(inputs.device))
            return out
        from qtool.engine.blockwise import HessianCollector

        c = HessianCollector({g[0]: block.get_submodule(g[0]) for g in groups}, vectors=True)
        try:
            inputs.run(block, before_each=c.new_pass, outputs=False)
        finally:
            c.remove()
        out = {}
        for g in groups:
            o = c.owner.get(g[0], g[0])
            if o not in c.tokens:
                raise UsageError(f"{inputs.prefix}.{g[0]}.weight: the model's forward never called this layer on the calibration data")
            n = c.tokens[o]
            G, m = c.sum[o] / n, c.sum_abs[o] / n
            if not (torch.isfinite(G).all() and torch.isfinite(m).all()):
                raise NumericalError(f"{inputs.prefix}: NaN/Inf in the inputs of {g[0]} (the calibration activations); nothing was written")
            out[g[0]] = (G, m)
        return out

    def quantize_block(self, block, inputs: BlockInputs, specs: dict[str, LayerSpec], targets, progress: MethodProgress) -> BlockResult:
        from qtool.engine.block_engine import input_groups

        p = self.params
        groups, owner = input_groups(block, inputs, list(specs))
        # linears the probe sample never reached (MoE experts) come as one group: each is its own input
        groups = [[m for m in grp if owner[m] == o] for grp in groups for o in dict.fromkeys(owner[m] for m in grp)]
        stats = self.group_statistics(block, inputs, groups)
        folds = discover_folds(block, inputs, groups)
        total = len(groups) * p.alpha_grid
        result = BlockResult({})
        chosen: dict[str, tuple[float, torch.Tensor, float, float]] = {}
        for gi, g in enumerate(groups):
            weights = [block.get_submodule(m).weight.detach().float() for m in g]
            G, x_mean = stats[g[0]]
            if folds[g[0]] is None or p.alpha_grid == 1:
                chosen[g[0]] = (0.0, torch.ones_like(x_mean), math.nan, math.nan)
                progress((gi + 1) * p.alpha_grid, total, g[0])
                continue
            try:
                chosen[g[0]] = search_scale(weights, [specs[m] for m in g], G, x_mean, p.alpha_grid, p.duo_scaling,
                                            on_step=lambda i, _g=gi, _m=g[0]: progress(_g * p.alpha_grid + i + 1, total, _m))
            except NumericalError as e:
                raise NumericalError(f"{inputs.prefix}.{g[0]}: {e}; nothing was written") from None
        replaced = self._apply(block, groups, folds, chosen)
        result.replaced.update(replaced)
        for g in groups:
            G, _ = stats[g[0]]
            s = chosen[g[0]][1]
            Gs = G / torch.outer(s, s)  # the Gram of x / s, the scaled linears' input
            for m in g:
                w = block.get_submodule(m).weight.detach().float()
                if p.clip:
                    wc, ratios = search_clip(w, specs[m], Gs, p.clip_grid, p.max_shrink)
                else:
                    wc, ratios = w, torch.ones(1)
                qw = _rtn(wc, specs[m])
                loss = output_loss(w - qw.dequantize(torch.float32), Gs) / w.shape[0]
                if not math.isfinite(loss):
                    raise NumericalError(f"{inputs.prefix}.{m}: NaN/Inf in the AWQ clipping loss; nothing was written")
                a, _, _, rtn = chosen[g[0]]
                fold = folds[g[0]]
                result.quantized[m] = qw
                result.stats[m] = {"alpha": a if fold else None, "scaled_into": fold.target if fold else None,
                                   "clip_ratio_mean": float(ratios.float().mean()), "loss": loss,
                                   "loss_rtn": rtn / sum(block.get_submodule(x).weight.shape[0] for x in g) if math.isfinite(rtn) else None}
                result.shares[m] = g[0]
        bare = [m for g in groups if folds[g[0]] is None for m in g]
        if bare:
            result.notes.append(f"awq: no foldable norm or linear before {', '.join(bare)} in the module graph: clipping only")
        return result

    @staticmethod
    def _apply(block, groups: list[list[str]], folds: dict[str, Fold | None], chosen) -> dict[str, torch.Tensor]:
        """Fold every group's s: linears' columns × s, the predecessor / s. -> the changed float tensors."""
        from qtool.methods.awq_fold import _assign

        changed: dict[str, torch.Tensor] = {}
        for g in groups:
            fold = folds[g[0]]
            if fold is None:
                continue
            s = chosen[g[0]][1]
            new = fold.folded(block, s)
            for m in g:
                new[f"{m}.weight"] = block.get_submodule(m).weight.detach().float() * s
            _assign(block, new)
            changed.update(new)
        return {k: v.detach().clone() for k, v in changed.items()}
