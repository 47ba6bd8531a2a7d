"""AQLM: Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme Compression of Large
Language Models via Additive Quantization" (ICML 2024, arXiv:2401.06118).

Each linear's weight is coded as groups of `in_group` input columns, each group the sum of M
codebook vectors (one per codebook of 2^B entries) times a per-output-row scale (core/codebook.py).
Schemes: `1x16` (one 65,536-entry codebook, 2 bits per weight in codes) and `2x8` (two 256-entry
codebooks, same code bits, far smaller codebooks).

Per layer, the objective is the layer output error ||WX − ŴX||² = tr((W − Ŵ) H (W − Ŵ)ᵀ) with the
calibration Hessian H = XᵀX (§3, eq. 2), damped by `damp` · mean(diag H). Rows are independent in it.
  1. init (§3.1): scales = row RMS; residual k-means of the scaled groups, codebook by codebook;
  2. rounds (§3.2-3.3), up to `steps` or until the relative improvement is below `tolerance`:
     a. codes: one sweep over the column groups; in group j, with the other groups fixed, the best
        vector v minimises vᵀH_jj v − 2 vᵀb (b = (H e₀)_j, e₀ the error without group j's vector),
        searched over the M codebooks with a beam of `beam` hypotheses per row (M = 1: exact);
        never worse than the current codes;
     b. codebooks and scales: `codebook_steps` Adam steps on the relative objective, codes fixed; a
        round whose update produces NaN/Inf is reverted (reported in the layer's stats);
  3. codebooks and scales rounded to float16 (what is stored), then one more code sweep on those.
With --finetune, once every linear of a block is coded: codebooks, scales and norms tuned against the
float block's outputs, codes fixed (§3.4; methods/aqlm_finetune.py).

Slow by nature (the 1x16 code search scores 65,536 vectors per group and row): progress per layer and
round with an ETA for the block; the block engine checkpoints after every block (--resume).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from qtool.core.codebook import CodebookWeight, reconstruct, residual_kmeans
from qtool.errors import UnsupportedError, UsageError
from qtool.methods import METHODS
from qtool.methods.base import BlockInputs, BlockMethod, BlockResult, LayerSpec, MethodParams, MethodProgress

STORE_DTYPE = torch.float16  # what aqlm checkpoints hold codebooks and scales in
CHUNK_ELEMS = 1 << 23  # candidate scores alive at once in the code search (32 MiB of float32)


@dataclass(frozen=True)
class AQLMParams(MethodParams):
    codebooks: int = field(default=2, metadata={"help": "Codebooks per group, M (1x16: 1, 2x8: 2)."})
    codebook_bits: int = field(default=8, metadata={"help": "Bits per codebook code, B: 2^B vectors per codebook (1x16: 16, 2x8: 8)."})
    in_group: int = field(default=8, metadata={"help": "Input columns per coded group (AQLM's in_group_size)."})
    beam: int = field(default=8, metadata={"help": "Beam width of the code search across codebooks."})
    steps: int = field(default=3, metadata={"help": "Rounds of code search + codebook update per layer (at most)."})
    tolerance: float = field(default=0.01, metadata={"help": "Stop a layer's rounds when the relative error improves by less than this fraction."})
    codebook_steps: int = field(default=30, metadata={"help": "Adam steps on codebooks and scales per round."})
    codebook_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of codebooks and scales."})
    kmeans_iters: int = field(default=8, metadata={"help": "Lloyd iterations of the k-means codebook initialisation."})
    damp: float = field(default=0.01, metadata={"help": "Damping, a fraction of mean(diag H) added to its diagonal."})
    finetune: bool = field(default=False, metadata={"help": "After a block is coded, tune its codebooks, scales and norms (codes fixed) against the float block's outputs on the calibration inputs (Adam)."})
    # finetune defaults chosen by the AQLM bench (tests/bench/results/aqlm.md, SmolLM2 2x8, 16 x 256 calibration): 2 epochs
    # at 1e-4 (8 Adam steps a block) took held-out perplexity 267.3 -> 250.1; 10 epochs at 1e-3 to 119.2
    finetune_epochs: int = field(default=10, metadata={"help": "--finetune: passes over the calibration samples per block (the best one kept)."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "--finetune: Adam learning rate."})
    finetune_batch: int = field(default=4, metadata={"help": "--finetune: calibration samples per Adam step."})

    def __post_init__(self) -> None:
        if not 1 <= self.codebooks <= 8:
            raise UsageError(f"--codebooks {self.codebooks}: expected 1..8 (1x16: 1, 2x8: 2)")
        if not 1 <= self.codebook_bits <= 16:
            raise UsageError(f"--codebook-bits {self.codebook_bits}: expected 1..16 (aqlm stores codes as int8 / int16)")
        if self.in_group < 1:
            raise UsageError(f"--in-group {self.in_group}: must be >= 1")
        for name, v in (("beam", self.beam), ("kmeans_iters", self.kmeans_iters)):
            if v < 1:
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        for name, v in (("finetune_epochs", self.finetune_epochs), ("finetune_batch", self.finetune_batch)):
            if v < 1:
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        if not 0 < self.finetune_lr < 1:
            raise UsageError(f"--finetune-lr {self.finetune_lr}: expected a small positive rate, e.g. 1e-3")
        for name, v in (("steps", self.steps), ("codebook_steps", self.codebook_steps)):
            if v < 0:
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 0")
        if not 0 <= self.tolerance < 1:
            raise UsageError(f"--tolerance {self.tolerance}: expected a fraction in [0, 1)")
        if not 0 < self.codebook_lr < 1:
            raise UsageError(f"--codebook-lr {self.codebook_lr}: expected a small positive rate, e.g. 1e-3")
        if not 0 < self.damp < 1e3:
            raise UsageError(f"--damp {self.damp}: expected a positive fraction of mean(diag H), e.g. 0.01")
        need = codebook_memory(self)
        from qtool.engine.activations import available_memory

        have = available_memory()
        if need > have:
            raise UsageError(f"--codebooks {self.codebooks} --codebook-bits {self.codebook_bits} --in-group {self.in_group}: "
                             f"the codebooks and their optimiser state need about {need / 2**30:.1f} GiB per layer, "
                             f"{have / 2**30:.1f} GiB are available; use fewer codebook bits (e.g. 2x8)")


def codebook_memory(p: AQLMParams) -> int:
    """Bytes one layer's codebooks need while they are tuned: values, gradient and two Adam moments
    (float32), plus the k-means sums and the squared norms the code search precomputes."""
    entries = p.codebooks * 2**p.codebook_bits * p.in_group
    return entries * 4 * 6


@dataclass(frozen=True)
class AQLMStats:
    rel_error: float  # tr(EHEᵀ)/tr(WHWᵀ) at the end
    rel_error_init: float  # after the k-means initialisation
    rounds: int
    reverted: int  # rounds whose codebook update hit NaN/Inf and was undone
    seconds: float
    loss: float  # the final objective tr(EHEᵀ) (with the 2/n of H)


# -- pure functions ---------------------------------------------------------------------------------
def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, norm: float) -> float:
    E = W - W_hat
    return float(((E @ H) * E).sum()) / norm


def search_group(b: torch.Tensor, Hjj: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, s: torch.Tensor,
                 sq: torch.Tensor, beam: int) -> torch.Tensor:
    """The codes [rows, M] of one group minimising f(v) = vᵀ Hjj v − 2 vᵀ b per row, v = s Σ_m books[m][code_m]:
    a beam search over the codebooks in order, starting from the current `codes` (so never worse).
    `sq[m][k]` = books[m][k]ᵀ Hjj books[m][k]."""
    rows, M = codes.shape
    K = books.shape[1]
    hyp = codes.unsqueeze(1).long()  # [rows, nb, M]
    sv = s.view(-1, 1, 1)
    v = sv * sum(books[m][hyp[..., m]] for m in range(M))  # [rows, nb, g]
    for m in range(M):
        base = v - sv * books[m][hyp[..., m]]
        fb = ((base @ Hjj) * base).sum(-1) - 2 * (base * b.unsqueeze(1)).sum(-1)  # [rows, nb]
        lin = 2 * sv * (base @ Hjj - b.unsqueeze(1))  # [rows, nb, g]
        score = fb.unsqueeze(-1) + lin @ books[m].t() + (s * s).view(-1, 1, 1) * sq[m].view(1, 1, -1)
        nb = hyp.shape[1]
        flat = score.reshape(rows, nb * K)
        if m == M - 1:  # the last codebook: only the best hypothesis is wanted
            idx = flat.argmin(1, keepdim=True)
        else:
            idx = flat.topk(min(beam, nb * K), dim=1, largest=False).indices
        parent, k = idx // K, idx % K
        hyp = torch.gather(hyp, 1, parent.unsqueeze(-1).expand(-1, -1, M)).clone()
        hyp[..., m] = k
        v = torch.gather(base, 1, parent.unsqueeze(-1).expand(-1, -1, base.shape[-1])) + sv * books[m][k]
    return hyp[:, 0].to(codes.dtype)


def code_sweep(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, s: torch.Tensor,
               beam: int) -> torch.Tensor:
    """One pass over the column groups (§3.2, beam search over codes): each group's codes re-chosen
    given all other groups' current ones, the error's H-image kept up to date. Returns new codes."""
    out, G, M = codes.shape
    g = books.shape[-1]
    codes = codes.clone()
    W_hat = reconstruct(codes, books, s)
    HE = (W - W_hat) @ H
    K = books.shape[1]
    rows = max(1, CHUNK_ELEMS // (min(beam, K) * K if M > 1 else K))
    for j in range(G):
        cols = slice(j * g, (j + 1) * g)
        Hjj = H[cols, cols]
        sq = torch.einsum("mkd,de,mke->mk", books, Hjj, books)
        cur = W_hat[:, cols]
        b = HE[:, cols] + cur @ Hjj
        new = torch.cat([search_group(b[r:r + rows], Hjj, codes[r:r + rows, j], books, s[r:r + rows], sq, beam)
                         for r in range(0, out, rows)])
        codes[:, j] = new
        v = s.unsqueeze(1) * sum(books[m][new[:, m].long()] for m in range(M))
        HE -= (v - cur) @ H[cols, :]
        W_hat[:, cols] = v
    return codes


def tune_codebooks(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, s: torch.Tensor,
                   steps: int, lr: float, norm: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Adam on codebooks and (multiplicatively) scales with the codes fixed (§3.3) -> (books, scales,
    ok); ok False when the update produced NaN/Inf, and the inputs come back unchanged."""
    if steps == 0:
        return books, s, True
    cb = books.clone().requires_grad_(True)
    t = torch.ones_like(s, requires_grad=True)
    opt = torch.optim.Adam([cb, t], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            E = W - reconstruct(codes, cb, s * t)
            loss = ((E @ H) * E).sum() / norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    new_b, new_s = cb.detach(), (s * t).detach()
    ok = bool(torch.isfinite(new_b).all() and torch.isfinite(new_s).all())
    return (new_b, new_s, True) if ok else (books, s, False)


def aqlm_quantize(w: torch.Tensor, H: torch.Tensor, p: AQLMParams, *, seed: int = 0,
                  on_round=lambda r, total, rel: None) -> tuple[CodebookWeight, AQLMStats]:
    """One layer: W [out, in] and its Hessian H [in, in] -> (CodebookWeight, stats)."""
    t0 = time.perf_counter()
    W = w.detach().to(torch.float32)
    out, cols = W.shape
    g, M, K = p.in_group, p.codebooks, 2**p.codebook_bits
    if cols % g:
        raise UnsupportedError(f"input width {cols} is not a multiple of --in-group {g}")
    H = H.to(W.device, torch.float32)
    H = H + p.damp * float(torch.diag(H).mean().clamp_min(1e-12)) * torch.eye(cols, device=W.device)
    norm = max(float(((W @ H) * W).sum()), 1e-30)
    gen = torch.Generator().manual_seed(seed)
    s = W.pow(2).mean(1).sqrt().clamp_min(1e-8)
    books, flat = residual_kmeans((W / s.unsqueeze(1)).reshape(-1, g).cpu(), M, K, p.kmeans_iters, gen)
    books, codes = books.to(W.device), flat.reshape(out, cols // g, M).to(W.device, torch.int32)
    rel = rel0 = relative_error(W, reconstruct(codes, books, s), H, norm)
    rounds = reverted = 0
    for r in range(p.steps):
        codes = code_sweep(W, H, codes, books, s, p.beam)
        swept = relative_error(W, reconstruct(codes, books, s), H, norm)
        nb, ns, ok = tune_codebooks(W, H, codes, books, s, p.codebook_steps, p.codebook_lr, norm)
        new = relative_error(W, reconstruct(codes, nb, ns), H, norm) if ok else math.nan
        if not math.isfinite(new):
            reverted += 1  # NaN/Inf in the update: this round's codebooks are not kept
            new = swept
        elif new > swept:  # Adam overshot (a near-exact fit): the codebooks before it stay
            new = swept
        else:
            books, s = nb, ns
        rounds += 1
        on_round(r + 1, p.steps, new)
        improved = rel - new
        rel = new
        if improved < p.tolerance * max(rel, 1e-30) and r > 0:
            break
    books, s = books.to(STORE_DTYPE).float(), s.to(STORE_DTYPE).float()  # what is stored
    codes = code_sweep(W, H, codes, books, s, p.beam)
    W_hat = reconstruct(codes, books, s)
    rel = relative_error(W, W_hat, H, norm)
    qw = CodebookWeight(codes.to(torch.int32), books.to(STORE_DTYPE), s.to(STORE_DTYPE), g, p.codebook_bits)
    return qw, AQLMStats(rel, rel0, rounds, reverted, time.perf_counter() - t0, rel * norm)


def layer_seed(name: str) -> int:
    """A seed per layer from its name: runs (and resumed runs) repeat exactly."""
    return zlib.crc32(name.encode())


# -- the method -------------------------------------------------------------------------------------
@METHODS.register("aqlm")
class AQLMMethod(BlockMethod):
    """AQLM (Egiazarian et al. 2024): additive codebooks (1x16, 2x8) fitted to the calibration Hessian."""

    params = AQLMParams
    needs_calibration = True
    supported_kinds = ("int",)  # the recipe's integer type is not used: the scheme is --codebooks x --codebook-bits
    uses_stats = ("xtx",)
    formats = ("aqlm",)  # what can hold its CodebookWeights
    weight_kind = "codebook"

    def __init__(self, **params: object) -> None:
        self.params = AQLMParams(**params)  # type: ignore[arg-type]
        self.wants_targets = self.params.finetune  # the float block's outputs, for --finetune

    def quantize_with_stats(self, w: torch.Tensor, spec: LayerSpec, H: torch.Tensor,
                            on_round=lambda r, total, rel: None) -> tuple[CodebookWeight, AQLMStats]:
        if w.shape[1] % self.params.in_group:
            raise UnsupportedError(f"{spec.name}: input width {w.shape[1]} is not a multiple of --in-group "
                                   f"{self.params.in_group}")
        return aqlm_quantize(w, H, self.params, seed=layer_seed(spec.name), on_round=on_round)

    def quantize_block(self, block, inputs: BlockInputs, specs: dict[str, LayerSpec], targets,
                       progress: MethodProgress) -> BlockResult:
        """True-sequential like GPTQ: per input group (q/k/v, o, gate/up, down), the Hessians from a
        pass in which the groups before it hold their coded weights."""
        from qtool.engine.block_engine import input_groups
        from qtool.engine.blockwise import group_hessians

        groups, _ = input_groups(block, inputs, list(specs))
        result = BlockResult({})
        total = len(specs) * max(1, self.params.steps)
        done, t0 = 0, time.perf_counter()

        def report(m: str, r: int, rounds: int, rel: float) -> None:
            elapsed = time.perf_counter() - t0
            eta = elapsed / max(done + r, 1) * (total - done - r)
            progress(done + r, total, f"{m} round {r}/{rounds} rel.err {rel:.4g} ETA {eta:.0f}s")

        for gi, group in enumerate(groups):
            last = group[-1] if len(groups) > 1 else None
            collector = group_hessians(block, inputs, group, last)
            for m in group:
                lin = block.get_submodule(m)
                progress(done, total, f"{m} k-means init")
                qw, st = self.quantize_with_stats(lin.weight.detach(), specs[m], collector.hessian(m),
                                                  on_round=lambda r, n, rel, m=m: report(m, r, n, rel))
                with torch.no_grad():
                    lin.weight.copy_(qw.dequantize(torch.float32))
                result.quantized[m], result.stats[m] = qw, asdict(st)
                result.shares[m] = collector.owner[m]
                if st.reverted:
                    result.notes.append(f"aqlm: NaN/Inf in a codebook update; the round was reverted ({m})")
                done += max(1, self.params.steps)
            del collector
        if self.params.finetune:
            self._finetune(block, inputs, specs, targets, result, progress)
        progress(total, total, "")
        return result

    def _finetune(self, block, inputs: BlockInputs, specs: dict[str, LayerSpec], targets, result: BlockResult,
                  progress: MethodProgress) -> None:
        """--finetune: the block's codebooks, scales and norms against the float block's outputs
        (methods/aqlm_finetune.py); the tuned codebooks replace the coded ones, the norms are returned
        as replaced float tensors, the MSE before/after goes into every linear's stats."""
        from qtool.methods.aqlm_finetune import finetune_block

        p = self.params
        dtype = next(iter(specs.values())).scale_dtype or torch.float32  # the checkpoint's dtype: what norms are stored in
        qws, norms, st = finetune_block(block, result.quantized, inputs, targets, inputs.call, epochs=p.finetune_epochs,
                                        lr=p.finetune_lr, batch_size=p.finetune_batch, norm_dtype=dtype,
                                        seed=layer_seed(inputs.prefix), progress=lambda d, n, w: progress(d, n, w))
        with torch.no_grad():
            for m, qw in qws.items():
                block.get_submodule(m).weight.copy_(qw.dequantize(torch.float32))
        result.quantized.update(qws)
        result.replaced.update(norms)
        for m in qws:
            result.stats[m].update(finetune_mse_before=st.mse_before, finetune_mse_after=st.mse_after,
                                   finetune_best_epoch=st.best_epoch)
        if st.reverted:
            result.notes.append("aqlm --finetune: NaN/Inf in an epoch; the best state before it was kept")
        if not st.best_epoch:
            result.notes.append("aqlm --finetune: no epoch lowered the block's output error; the coded block was kept")
