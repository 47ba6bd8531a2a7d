"""Learned rounding (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent", 2023/24).

Per decoder block, every linear's weight W [out, in] is quantized as

    s = range(lo·f_min, hi·f_max) / span,     z = round(qmin - lo·f_min / s)      (asymmetric)
    s = max(-lo·f_min, hi·f_max) / (span / 2), z = 0                             (symmetric)
    q = clamp(round(W / s + V) + z, qmin, qmax),   Ŵ = (q - z) · s

with lo/hi the group's min/max (clamped to include 0), one rounding offset V ∈ [-0.5, 0.5] per
weight and one pair of clipping factors f_min, f_max ∈ [0, 1] per group (§3: "SignRound"). round()
is a straight-through estimator. V and f minimise the MSE between the float block's outputs
(the targets) and the quantized block's outputs on the inputs the already-quantized blocks
produced, by signed gradient descent: p ← p − lr_t · sign(∂L/∂p), lr_t = lr · (1 − t / iters)
(lr = 1 / iters by default, so that V moves at most ~0.5 over the run). The iteration with the
lowest loss is kept. Iteration 0 (V = 0, f = 1) is exactly round-to-nearest, so the kept result is
never worse than RTN on the measured batch.

The grid is the one `core/affine.py` uses (compressed-tensors' convention; llama.cpp's signed
symmetric scale where the type asks for it), scales are rounded to the storage dtype inside the
forward, so the returned codes are exactly those the tuned forward saw.

`iters = 0` is the cheap mode: importance-weighted round-to-nearest, where each group's clipping
factor is searched on a grid to minimise Σ_j imp_j (W_ij − Ŵ_ij)², imp_j = mean x_j² over the
calibration tokens reaching the linear.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from qtool.core.grouping import to_groups
from qtool.core.qweight import QuantizedWeight
from qtool.engine.activations import ActivationStore
from qtool.engine.attention import block_forward as _forward
from qtool.engine.attention import fast_attention
from qtool.errors import NumericalError, UsageError
from qtool.methods import METHODS
from qtool.methods.base import AMP_HELP, BlockInputs, BlockMethod, BlockResult, LayerSpec, MethodParams, MethodProgress


# -- parameters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoRoundParams(MethodParams):
    iters: int = field(default=200, metadata={"help": "Signed-gradient steps per block; 0: importance-weighted round-to-nearest (no tuning)."})
    lr: float | None = field(default=None, metadata={"help": "Step size of the rounding offsets and clipping factors, decayed linearly to 0 over the iterations; unset: 1 / iters."})
    batch_size: int = field(default=8, metadata={"help": "Calibration samples per tuning step (at most --samples)."})
    batch_seed: int = field(default=0, metadata={"help": "Seed of the order in which tuning steps draw their samples."})
    amp: bool = field(default=False, metadata={"help": AMP_HELP})
    clip_grid: int = field(default=20, metadata={"help": "--iters 0: clipping factors searched per group (1 down to 1 - max_shrink)."})
    max_shrink: float = field(default=0.5, metadata={"help": "--iters 0: largest fraction of a group's range the clipping search may cut."})
    full_range: bool = field(default=True, metadata={"help": "Symmetric grids: scale = the group's largest-magnitude weight / qmin (signed), "
                                                     "so all 2^bits codes are used (AutoRound's and llama.cpp's rule); off: "
                                                     "max|w| / ((2^bits - 1) / 2), compressed-tensors' rule."})
    tune_toward: str = field(default="model", metadata={"help": "What each block's quantized output is tuned toward: 'model', the float "
                                                   "model's own hidden states (later blocks also correct earlier blocks' error, "
                                                   "as AutoRound does); 'block', the float block on the quantized inputs."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, samples: int | None = None) -> None:
        if self.iters < 0:
            raise UsageError(f"--iters {self.iters}: must be >= 0 (0 = importance-weighted round-to-nearest)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be >= 1")
        if samples is not None and self.batch_size > samples:
            raise UsageError(f"--batch-size {self.batch_size}: larger than --samples {samples}")
        if not 1 <= self.clip_grid <= 1000:
            raise UsageError(f"--clip-grid {self.clip_grid}: expected 1..1000 factors")
        if not 0 <= self.max_shrink < 1:
            raise UsageError(f"--clip-range {self.max_shrink}: expected a fraction in [0, 1)")
        if self.tune_toward not in ("model", "block"):
            raise UsageError(f"--tune-toward {self.tune_toward!r}: expected 'model' or 'block'")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


@dataclass
class BlockTuneStats:
    """One block's tuning run, for the report."""

    init_loss: float  # MSE at iteration 0 (round-to-nearest), on its batch
    best_loss: float
    best_iter: int
    iters_run: int
    seconds: float = 0.0
    warning: str | None = None  # e.g. the loss became NaN at iteration t: reverted to the best
    attention: str = "eager"  # the attention implementation the tuning forwards ran (fast_attention)
    losses: list[float] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)  # linears no calibration token reached: round-to-nearest


# -- the grid -----------------------------------------------------------------------------------------
class Tunable:
    """What the tuning loop needs of a grid: `params()` (trained), `clamp_()`, `qdq()` (the
    differentiable Ŵ) and `result()` (the QuantizedWeight of the current parameters, which is also
    how the best iteration is kept)."""

    def params(self) -> list[torch.Tensor]:
        raise NotImplementedError


class LinearGrid(Tunable):
    """One linear's fixed data (weight groups, their ranges) and its trainable V, f_min, f_max."""

    def __init__(self, w: torch.Tensor, spec: LayerSpec) -> None:
        if not spec.qtype.is_int:
            raise UsageError(f"{spec.name}: autoround produces integer weights, not {spec.qtype.name}")
        if spec.strategy not in ("channel", "group"):
            raise UsageError(f"{spec.name}: autoround supports per-channel or grouped scales, not {spec.strategy!r}")
        self.spec = spec
        self.shape = tuple(w.shape)
        self.scale_dtype = spec.scale_dtype or w.dtype
        w32 = w.detach().to(torch.float32)
        self.groups = to_groups(w32, spec.group_size) if spec.strategy == "group" else w32.unsqueeze(1)  # [out, G, k]
        lo, hi = torch.aminmax(self.groups, dim=-1)
        self.lo, self.hi = lo.clamp(max=0), hi.clamp(min=0)
        if spec.qtype.signed_scale and spec.symmetric:  # the peak keeps its sign (lands on qmin)
            self.peak = self.groups.gather(-1, self.groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        self.V = torch.zeros_like(self.groups)
        self.fmin = torch.ones_like(self.lo)
        self.fmax = torch.ones_like(self.hi)

    def params(self) -> list[torch.Tensor]:
        return [self.V, self.fmin, self.fmax]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.V.clamp_(-0.5, 0.5)
            self.fmin.clamp_(0, 1)
            self.fmax.clamp_(0, 1)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """s [out, G] (float32 holding a storage-dtype value; differentiable in f), z [out, G] or None."""
        qt = self.spec.qtype
        span = qt.qmax - qt.qmin
        lo, hi = self.lo * self.fmin, self.hi * self.fmax
        if self.spec.symmetric:
            if qt.signed_scale:
                s = torch.where(self.peak < 0, self.peak * self.fmin, self.peak * self.fmax) / qt.qmin
            else:
                s = torch.maximum(-lo, hi) / (span / 2)
            z = None
        else:
            s = (hi - lo) / span
        s = s.to(self.scale_dtype).to(torch.float32)  # the stored scale (the cast passes gradients)
        s = torch.where(s == 0, torch.ones_like(s), s)  # as core/affine: an all-zero range gets scale 1
        if not self.spec.symmetric:
            z = _round_ste(qt.qmin - lo / s).clamp(qt.qmin, qt.qmax)
        return s, z

    def qdq(self, fused: bool = True) -> torch.Tensor:
        """Ŵ [out, in] float32, differentiable in V, f_min, f_max. `fused`: one autograd node for the
        per-weight part (`_FusedQDQ`); otherwise the plain autograd reference."""
        qt = self.spec.qtype
        s, z = self.scale_zero()
        if fused:
            w = _FusedQDQ.apply(self.groups, self.V, s, z, qt.qmin, qt.qmax)
        else:
            s3 = s.unsqueeze(-1)
            if z is None:
                w = _round_ste(self.groups / s3 + self.V).clamp(qt.qmin, qt.qmax) * s3
            else:  # z added before rounding, as core/affine does (round-half-even ties then agree)
                z3 = z.unsqueeze(-1)
                w = (_round_ste(self.groups / s3 + self.V + z3).clamp(qt.qmin, qt.qmax) - z3) * s3
        return w.reshape(self.shape[0], -1)[:, : self.shape[1]]

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The integer codes, scales and zero points of the current parameters."""
        qt, spec = self.spec.qtype, self.spec
        s, z = self.scale_zero()
        q = self.groups / s.unsqueeze(-1) + self.V
        if z is not None:
            q += z.unsqueeze(-1)
        q = q.round_().clamp_(qt.qmin, qt.qmax).to(torch.int8).reshape(self.shape[0], -1)[:, : self.shape[1]].contiguous()
        zero = None if z is None else z.to(torch.int8)
        return QuantizedWeight(qt, q, s.to(self.scale_dtype), zero, spec.strategy,
                               spec.group_size if spec.strategy == "group" else None)


def make_grid(w: torch.Tensor, spec: LayerSpec, full_range: bool = False):
    """The tuning grid of one linear: a GGUF K type's own (autoround_kgrid) where the spec names one
    and the rows are whole super-blocks, else the integer grid of `spec` (`full_range`: symmetric
    integer grids with the signed peak / qmin scale)."""
    from qtool.methods import autoround_kgrid

    if autoround_kgrid.fits(spec, tuple(w.shape)):
        return autoround_kgrid.KLinearGrid(w, spec)
    return LinearGrid(w, full_range_spec(spec) if full_range else spec)


def full_range_spec(spec: LayerSpec) -> LayerSpec:
    """`spec` with the signed full-range scale where its grid is symmetric integer (QType.signed_scale:
    the group's largest-magnitude weight lands on qmin, all 2^bits codes in use); else unchanged."""
    from dataclasses import replace

    if not (spec.symmetric and spec.qtype.is_int) or spec.qtype.signed_scale:
        return spec
    return replace(spec, qtype=replace(spec.qtype, signed_scale=True))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class _FusedQDQ(torch.autograd.Function):
    """Ŵ = (clamp(round(W / s + V) + z) − z) · s with a straight-through round, as one node.

    Backward, with g = ∂L/∂Ŵ and m = 1 where the clamp did not bite (torch's clamp passes the
    gradient on its bounds too):  ∂V = g·m·s;  ∂s = Σ_k g·(q − z) − Σ_k g·m·W / s;
    ∂z = s · Σ_k g·(m − 1). Saves nothing but its inputs (W, V, s, z, alive anyway): the backward
    recomputes q − z and m by the forward's own operations, the same values bit for bit, instead of
    keeping a [out, in] float32 and a bool tensor per linear through the block's forward and backward
    (0.2 GiB on a 1.1 B block). `LinearGrid.qdq(fused=False)` is the reference it is tested against."""

    @staticmethod
    def _codes(W, V, s, z, qmin, qmax):
        """(q − z, m): the clamped codes less the zero point, and where the clamp did not bite."""
        x = torch.div(W, s.unsqueeze(-1)).add_(V)
        if z is not None:
            x.add_(z.unsqueeze(-1))
        x.round_()
        mask = (x >= qmin) & (x <= qmax)
        x.clamp_(qmin, qmax)
        if z is not None:
            x.sub_(z.unsqueeze(-1))
        return x, mask

    @staticmethod
    def forward(ctx, W, V, s, z, qmin, qmax):
        qz, _ = _FusedQDQ._codes(W, V, s, z, qmin, qmax)
        ctx.save_for_backward(W, V, s, z)
        ctx.bounds = (qmin, qmax)
        return qz.mul_(s.unsqueeze(-1))

    @staticmethod
    def backward(ctx, g):
        W, V, s, z = ctx.saved_tensors
        qz, mask = _FusedQDQ._codes(W, V, s, z, *ctx.bounds)
        gm = g * mask
        del mask
        dV = gm * s.unsqueeze(-1)
        ds = torch.einsum("ogk,ogk->og", g, qz) - torch.einsum("ogk,ogk->og", gm, W) / s
        dz = (gm.sum(-1) - g.sum(-1)) * s if z is not None else None
        return None, dV, ds, dz, None, None


# -- tuning a block -----------------------------------------------------------------------------------
def _stack(hidden: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    return hidden if isinstance(hidden, torch.Tensor) else torch.cat([h.reshape(1, *h.shape[-2:]) for h in hidden])


STACK_BYTES = 1 << 30  # samples held stacked on the device up to this size; beyond, gathered per step


class _Samples:
    """Per-sample tensors [1, L, h] (a list, an ActivationStore, or stacked [n, L, h]) read as
    batches on `device`: stacked there once when small, else gathered batch by batch (memory stays
    near one batch above what the engine already holds)."""

    def __init__(self, seq, device: torch.device | None = None) -> None:
        self.seq, self.n = seq, len(seq)
        first = seq[0]
        self.device = device or first.device
        self.stacked = None
        if isinstance(seq, torch.Tensor) and seq.device == self.device:
            self.stacked = seq
        elif isinstance(seq, ActivationStore) and self.device.type == "cpu":  # a view of the engine's store, not a copy
            self.stacked = seq.stacked().view(self.n, *first.shape[-2:])
        elif self.n * first.numel() * 4 <= STACK_BYTES:
            self.stacked = torch.cat([seq[i].reshape(1, *first.shape[-2:]).to(self.device, torch.float32) for i in range(self.n)])

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None:
            return self.stacked[idx.to(self.stacked.device)]
        shape = self.seq[0].shape[-2:]
        return torch.cat([self.seq[i].reshape(1, *shape) for i in idx.tolist()]).to(self.device, torch.float32)


class _Swapped:
    """While active, each named linear of `block` computes x @ Ŵᵀ with Ŵ from `weights[name]` (the
    module itself, its weight and bias, stay untouched: the rounding wraps around it)."""

    def __init__(self, block: torch.nn.Module, names: list[str]) -> None:
        self.block, self.names = block, names
        self.weights: dict[str, torch.Tensor] = {}
        self.called: set[str] = set()  # linears the forward reached (an unrouted expert never is)

    def __enter__(self) -> "_Swapped":
        for n in self.names:
            lin = self.block.get_submodule(n)
            lin.forward = self._make(n, lin)
        return self

    def _make(self, name: str, lin: torch.nn.Linear):
        def forward(x):
            self.called.add(name)
            return torch.nn.functional.linear(x, self.weights[name].to(x.dtype), lin.bias)

        return forward

    def __exit__(self, *exc) -> None:
        for n in self.names:
            del self.block.get_submodule(n).forward


@torch.no_grad()
def block_outputs(block: torch.nn.Module, hidden: list[torch.Tensor] | torch.Tensor, call: tuple[tuple, dict],
                  batch_size: int = 8) -> torch.Tensor:
    """The block's outputs [n, L, hidden] on stacked inputs, `batch_size` samples per forward."""
    x = _stack(hidden)
    return torch.cat([_forward(block, x[i : i + batch_size], call) for i in range(0, x.shape[0], batch_size)])


def tune_block(
    block: torch.nn.Module,
    specs: dict[str, LayerSpec],
    hidden: list[torch.Tensor] | torch.Tensor,
    call: tuple[tuple, dict],
    targets: torch.Tensor,
    params: AutoRoundParams = AutoRoundParams(),
    *,
    block_name: str = "block",
    weights: dict[str, torch.Tensor] | None = None,
    progress: MethodProgress = lambda *a: None,
) -> tuple[dict[str, QuantizedWeight], BlockTuneStats]:
    """Learned rounding of the linears `specs` names (module names inside `block`).

    hidden: the block's inputs, per sample [1, L, h] (a list or ActivationStore, or stacked
    [n, L, h]); call: the (args, kwargs) the model passes the block besides them; targets: the
    float block's outputs, likewise. Batches go to the block's device.
    weights: the checkpoint's weights per name (their dtype sets the scale dtype); default the
    module's own. The block's parameters are left unchanged. A linear no calibration token reaches
    (an MoE expert never routed to) gets no gradient and stays round-to-nearest (`stats.unreached`)."""
    from qtool.engine.distributed import current

    t0 = time.perf_counter()
    device = next(block.parameters()).device
    xs, ys = _Samples(hidden, device), _Samples(targets, device)
    comm, lo, n = current(), 0, len(xs)
    if comm.active:  # data parallel: this rank holds windows lo..lo+len(xs)-1 of n; batches are drawn over all n
        sizes = comm.all_gather_object(len(xs), what="the learned-rounding window count")
        lo, n = sum(sizes[:comm.rank]), sum(sizes)
    batch = min(params.batch_size, n)  # fewer samples than a batch (a short calibration set): every step takes them all
    names = list(specs)
    grids = {m: make_grid(weights[m] if weights else block.get_submodule(m).weight, specs[m], params.full_range) for m in names}
    trainable = [p for g in grids.values() for p in g.params()]
    frozen = [p for p in block.parameters() if p.requires_grad]
    sampler = _BatchSampler(n, batch, params.batch_seed)
    st = BlockTuneStats(math.nan, math.inf, 0, 0)
    best = None
    for p in frozen:
        p.requires_grad_(False)
    try:
        for p in trainable:
            p.requires_grad_(True)
        with fast_attention(block, xs.batch(torch.arange(1)), call) as st.attention, _Swapped(block, names) as sw:
            for t in range(params.iters):
                idx = sampler.next()
                sw.weights = {m: g.qdq() for m, g in grids.items()}
                if comm.active:
                    loss, value = _shard_loss(comm, block, call, xs, ys, idx, lo, batch, params.amp, trainable)
                else:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=params.amp):
                        out = _forward(block, xs.batch(idx), call)
                    loss = torch.nn.functional.mse_loss(out.float(), ys.batch(idx))
                    value = float(loss.detach())
                st.losses.append(value)
                if t == 0:
                    called = set().union(*comm.all_gather_object(sw.called, what="the learned-rounding reach")) if comm.active else sw.called
                    st.init_loss, st.unreached = value, sorted(set(names) - called)
                if not math.isfinite(value):
                    if best is None:
                        raise NumericalError(f"{block_name}: the block's output loss is {value} at the first "
                                             "iteration (NaN/Inf in its inputs or weights)")
                    st.warning = f"{block_name}: loss became {value} at iteration {t}; reverted to iteration {st.best_iter}"
                    break
                if value < st.best_loss:  # kept as its codes and scales: a quarter of a float32 copy of V
                    st.best_loss, st.best_iter = value, t
                    best = None  # the previous best goes before the new one is made
                    best = {m: g.result() for m, g in grids.items()}
                progress(t + 1, params.iters, f"loss {value:.3g}")
                if t < params.iters - 1:  # the last update would never be measured
                    _sign_step(loss, trainable, params.learning_rate * (1 - t / params.iters))
                    for g in grids.values():
                        g.clamp_()
    finally:
        for p in trainable:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
    st.iters_run, st.seconds = len(st.losses), time.perf_counter() - t0
    return best if best is not None else {m: g.result() for m, g in grids.items()}, st


def _sign_step(loss: torch.Tensor, params: list[torch.Tensor], lr: float) -> None:
    """p ← p − lr · sign(∂loss/∂p) (signed gradient descent, §3). Over several processes each
    rank's gradient (of its share of the batch's loss) is summed over the ranks first, so every
    rank takes the same step."""
    from qtool.engine.distributed import current

    comm = current()
    for p in params:
        p.grad = None
    if loss.requires_grad:
        loss.backward()
    with torch.no_grad():
        for p in params:
            if comm.active:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                comm.all_reduce(g, what="the learned-rounding gradient all-reduce")
                p.sub_(g.sign(), alpha=lr)
            elif p.grad is not None:
                p.sub_(p.grad.sign(), alpha=lr)
            p.grad = None  # not kept through the next step's forward (a float32 copy of every V)


def _shard_loss(comm, block, call, xs: "_Samples", ys: "_Samples", idx: torch.Tensor, lo: int, batch: int, amp: bool,
                trainable: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """This rank's part of the batch's mean squared error (its windows of `idx`, global indices;
    the sum of squares over the whole batch's element count) and the batch's loss over all ranks."""
    mine = idx[(idx >= lo) & (idx < lo + len(xs))] - lo
    if len(mine):
        with torch.autocast(xs.device.type, dtype=torch.bfloat16, enabled=amp):
            out = _forward(block, xs.batch(mine), call)
        loss = torch.nn.functional.mse_loss(out.float(), ys.batch(mine), reduction="sum") / (batch * out[0].numel())
    else:  # none of this batch is ours: a zero that still takes part in the gradient all-reduce
        loss = sum(p.sum() * 0 for p in trainable)
    total = comm.all_reduce(loss.detach().double().reshape(1).clone(), what="the learned-rounding loss all-reduce")
    return loss, float(total)


class _BatchSampler:
    """Batches of distinct samples in a seeded shuffled order; a new order when the rest of one is
    shorter than a batch (its tail skipped), as AutoRound's sampler does."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += self.batch
        return self.order[self.pos - self.batch : self.pos]


# -- iters = 0: importance-weighted round-to-nearest ---------------------------------------------------
def importance_rtn(w: torch.Tensor, spec: LayerSpec, importance: torch.Tensor | None,
                   params: AutoRoundParams = AutoRoundParams()) -> QuantizedWeight:
    """Per group, the clipping factor f ∈ {1, 1 - r/grid, ...} (both ends shrunk by f) minimising
    Σ_j imp_j (W_ij − Ŵ_ij)²; imp [in] (None: uniform). f = 1 is plain round-to-nearest."""
    g = LinearGrid(w, full_range_spec(spec) if params.full_range else spec)
    cols = g.shape[1]
    imp = torch.ones(cols) if importance is None else importance.detach().to(torch.float32).clamp(min=0)
    imp = imp + 1e-8 * imp.mean().clamp(min=1e-12)  # channels no token reached still count a little
    if spec.strategy == "group":
        imp_g = to_groups(imp.unsqueeze(0), spec.group_size)  # [1, G, k], zero-padded
    else:
        imp_g = imp.view(1, 1, -1)
    best_err = None
    best_f = torch.ones_like(g.lo)
    with torch.no_grad():
        for i in range(params.clip_grid + 1):
            f = 1.0 - params.max_shrink * i / params.clip_grid
            g.fmin.fill_(f)
            g.fmax.fill_(f)
            s, z = g.scale_zero()
            q = g.groups / s.unsqueeze(-1)
            if z is not None:
                zz = z.unsqueeze(-1)
                deq = ((q + zz).round_().clamp_(spec.qtype.qmin, spec.qtype.qmax) - zz) * s.unsqueeze(-1)
            else:
                deq = q.round_().clamp_(spec.qtype.qmin, spec.qtype.qmax) * s.unsqueeze(-1)
            err = ((deq - g.groups).square_() * imp_g).sum(-1)  # [out, G]
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        g.fmin.copy_(best_f)
        g.fmax.copy_(best_f)
    return g.result()


class ImportanceCollector:
    """Forward-pre-hooks summing x² per input channel of each named linear (for `importance_rtn`)."""

    def __init__(self, block: torch.nn.Module, names: list[str]) -> None:
        self.names = list(names)
        self.sum_x2: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = x.square().sum(0).double()  # per sample in float32, over samples in float64 (as HessianCollector)
            self.sum_x2[name] = s if name not in self.sum_x2 else self.sum_x2[name].add_(s)
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def mean_x2(self, name: str) -> torch.Tensor | None:
        return self.sum_x2[name] / self.tokens[name] if name in self.sum_x2 else None

    def remove(self) -> None:
        """Hooks off; the sums summed over the ranks (several processes), then float32."""
        import sys

        for h in self._handles:
            h.remove()
        self._handles = []
        if sys.exc_info()[1] is not None:
            return
        from qtool.engine.distributed import current

        comm = current()
        if comm.active:
            seen = comm.all_gather_object({n: (self.tokens[n], self.sum_x2[n].shape[0]) for n in self.sum_x2},
                                          what="the importance exchange")
            for n in self.names:
                width = next((d[n][1] for d in seen if n in d), None)
                if width is None:
                    continue
                t = self.sum_x2.get(n, torch.zeros(width, dtype=torch.float64))
                self.sum_x2[n] = comm.all_reduce(t, what="the importance all-reduce")
                self.tokens[n] = sum(d[n][0] for d in seen if n in d)
        for n, v in self.sum_x2.items():
            self.sum_x2[n] = v.float()


def rtn_block(block: torch.nn.Module, specs: dict[str, LayerSpec], inputs: BlockInputs, params: AutoRoundParams = AutoRoundParams(),
              weights: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """iters = 0 for a whole block: one pass of the float block collects each linear's importance."""
    names = list(specs)
    col = ImportanceCollector(block, names)
    try:
        inputs.run(block, outputs=False)
    finally:
        col.remove()
    return {m: importance_rtn(weights[m] if weights else block.get_submodule(m).weight, specs[m], col.mean_x2(m), params)
            for m in names}


# -- the method -------------------------------------------------------------------------------------
@METHODS.register("autoround", aliases=("auto-round", "signround"))
class AutoRoundMethod(BlockMethod):
    """Learned rounding (SignRound) per decoder block; `iters = 0`: importance-weighted RTN."""

    params = AutoRoundParams
    wants_targets = True  # the default, iters > 0; an instance with iters = 0 says False
    target_stream = AutoRoundParams.tune_toward  # the default --tune-toward, declared once there

    def __init__(self, **params: object) -> None:
        self.params = AutoRoundParams(**params)  # type: ignore[arg-type]
        self.wants_targets = self.params.iters > 0
        self.target_stream = self.params.tune_toward

    def quantize_with_stats(self, w: torch.Tensor, spec: LayerSpec, H: torch.Tensor) -> tuple[QuantizedWeight, dict]:
        """One linear from its input statistics alone (no block to tune): importance-weighted RTN
        with imp_j = H_jj (∝ E[x_j²] for H = 2/n Σ XᵀX), what `iters = 0` does per layer."""
        return importance_rtn(w, spec, torch.diagonal(H).float(), self.params), {"iters": 0, "clip": "importance-weighted"}

    def check_samples(self, samples: int) -> None:
        """--batch-size against --samples, from the flags alone."""
        self.params.validate(samples)

    def quantize_block(self, block, inputs: BlockInputs, specs: dict[str, LayerSpec], targets, progress: MethodProgress) -> BlockResult:
        if self.params.iters == 0:
            qws = rtn_block(block, specs, inputs, self.params)
            return BlockResult(qws, stats={m: {"iters": 0, "clip": "importance-weighted"} for m in qws})
        qws, st = tune_block(block, specs, inputs.hidden, inputs.call, targets, self.params, block_name=inputs.prefix,
                             progress=progress)
        notes = [st.warning] if st.warning else []
        if st.unreached:
            notes.append(f"autoround: {inputs.prefix}: no calibration token reached {', '.join(st.unreached)}: round-to-nearest")
        figures = {"loss_rtn": st.init_loss, "loss": st.best_loss, "best_iter": st.best_iter, "iters": st.iters_run,
                   "block_seconds": round(st.seconds, 3), "attention": st.attention}
        return BlockResult(qws, stats={m: dict(figures) for m in qws}, notes=notes)
