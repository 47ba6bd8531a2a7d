"""AQLM block fine-tuning (`-m aqlm --finetune`; Egiazarian et al. 2024, §3.4): after every linear of
a decoder block is coded, the block's codebooks, scales and normalisation weights are tuned by Adam
to make the coded block's outputs match the float block's (the targets the block engine computes on
the same calibration inputs), MSE over the hidden states. The codes stay fixed (they are discrete;
the paper's block fine-tuning does not change them either); every other parameter stays frozen.

The block's loss over all calibration samples is measured before tuning and after every epoch, with
codebooks and scales rounded to float16 and norms to the checkpoint's dtype (what is stored); the
best state is kept, so fine-tuning never returns a block worse on its calibration data than it got,
and a NaN/Inf in an epoch reverts to the best state (said in the stats).

Over several processes (`--nproc N`) each rank holds a contiguous share of the calibration windows
(engine/distributed.py): the epochs' batches are drawn over all windows in the same seeded order on
every rank, each rank's loss is its share of the batch's mean, the gradients (and that loss) are
summed over the ranks in one all-reduce before every Adam step, and the per-epoch measurement sums
over all windows. Every rank so takes the same steps and keeps the same best state; against one
process the sums differ in their last bits (a different order), not in what is computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from qtool.core.codebook import CodebookWeight, reconstruct

STORE_DTYPE = torch.float16


@dataclass(frozen=True)
class FinetuneStats:
    mse_before: float  # block output MSE vs the float block, all calibration samples
    mse_after: float
    epochs: int  # epochs run
    best_epoch: int  # 0: tuning did not improve on the coded block, which is kept as it was
    reverted: bool  # an epoch hit NaN/Inf
    seconds: float


def norm_params(block: torch.nn.Module, linears: list[str]) -> list[str]:
    """The block's normalisation weights (state-dict names): parameters outside the quantized
    linears whose module is a norm (RMSNorm / LayerNorm, by class name)."""
    out = []
    for mod_name, mod in block.named_modules():
        if mod_name in linears or "norm" not in type(mod).__name__.lower():
            continue
        for p_name, _ in mod.named_parameters(recurse=False):
            out.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


class _Coded:
    """While active, each named linear computes x @ Ŵᵀ with Ŵ = reconstruct(codes, books, scales) from
    the trainable tensors (the module's own weight untouched)."""

    def __init__(self, block: torch.nn.Module, books: dict, scales: dict, codes: dict) -> None:
        self.block, self.books, self.scales, self.codes = block, books, scales, codes

    def __enter__(self) -> "_Coded":
        for n in self.books:
            lin = self.block.get_submodule(n)
            lin.forward = self._make(n, lin)
        return self

    def _make(self, name: str, lin: torch.nn.Linear):
        def forward(x):
            w = reconstruct(self.codes[name], self.books[name], self.scales[name])
            return torch.nn.functional.linear(x, w.to(x.dtype), lin.bias)

        return forward

    def __exit__(self, *exc) -> None:
        for n in self.books:
            del self.block.get_submodule(n).forward


def _forward(block: torch.nn.Module, x: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def finetune_block(block: torch.nn.Module, qws: dict[str, CodebookWeight], inputs, targets, call: tuple[tuple, dict],
                   *, epochs: int, lr: float, batch_size: int, norm_dtype: torch.dtype, seed: int = 0,
                   progress=lambda done, total, what: None) -> tuple[dict[str, CodebookWeight], dict[str, torch.Tensor], FinetuneStats]:
    """Tune `qws`' codebooks and scales and the block's norms -> (new CodebookWeights, {norm name: new
    float tensor} (empty when tuning did not help), stats). `inputs.sample(i)` and `targets[i]` are
    sample i's block input and float output [1, L, h]; `call` the block's other forward arguments.
    The block's own parameters are restored before returning."""
    from qtool.engine.distributed import current

    t0 = time.perf_counter()
    device = next(block.parameters()).device
    comm = current()
    n_local = n = len(inputs)
    lo = 0  # this rank's windows are lo .. lo + n_local - 1 of n
    if comm.active:
        sizes = comm.all_gather_object(n_local, what="the fine-tuning window count")
        lo, n = sum(sizes[:comm.rank]), sum(sizes)
    norms = norm_params(block, list(qws))
    params = dict(block.named_parameters())
    norm0 = {k: params[k].detach().clone() for k in norms}
    codes = {m: q.codes.to(device) for m, q in qws.items()}
    books = {m: q.codebooks.to(device, torch.float32).clone().requires_grad_(True) for m, q in qws.items()}
    scales = {m: q.scales.to(device, torch.float32).clone().requires_grad_(True) for m, q in qws.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    batch = max(1, min(batch_size, n))
    gen = torch.Generator().manual_seed(seed)

    def stored() -> dict:
        return {"books": {m: b.detach().to(STORE_DTYPE).float() for m, b in books.items()},
                "scales": {m: s.detach().to(STORE_DTYPE).float() for m, s in scales.items()},
                "norms": {k: params[k].detach().to(norm_dtype).float() for k in norms}}

    @torch.no_grad()
    def measure(state: dict) -> float:
        """The block's output MSE with `state` (rounded as stored); the float norms are put back."""
        keep = {k: params[k].detach().clone() for k in norms}
        for k in norms:
            params[k].copy_(state["norms"][k])
        with _Coded(block, state["books"], state["scales"], codes):
            total = sum(float(torch.nn.functional.mse_loss(_forward(block, inputs.sample(i), call),
                                                           targets[i].to(device, torch.float32), reduction="sum"))
                        for i in range(n_local))
        for k in norms:
            params[k].copy_(keep[k])
        count = sum(targets[i].numel() for i in range(n_local))
        if comm.active:
            sums = comm.all_reduce(torch.tensor([total, count], dtype=torch.float64), what="the fine-tuning measurement")
            total, count = float(sums[0]), float(sums[1])
        return total / count

    best = stored()
    before = best_loss = measure(best)
    best_epoch, reverted, run = 0, False, 0
    for p in frozen:
        p.requires_grad_(False)
    train = [*books.values(), *scales.values(), *(params[k] for k in norms)]
    try:
        for k in norms:
            params[k].requires_grad_(True)
        opt = torch.optim.Adam(train, lr=lr)
        steps = -(-n // batch)
        for e in range(epochs):
            order = torch.randperm(n, generator=gen).tolist()
            with torch.enable_grad(), _Coded(block, books, scales, codes):
                for s in range(steps):
                    idx = order[s * batch:(s + 1) * batch]
                    opt.zero_grad(set_to_none=True)
                    if comm.active:
                        value = _shard_step(comm, block, call, inputs, targets, idx, lo, n_local, train, device)
                    else:
                        x = torch.cat([inputs.sample(i) for i in idx])
                        y = torch.cat([targets[i].to(device, torch.float32) for i in idx])
                        loss = torch.nn.functional.mse_loss(_forward(block, x, call), y)
                        loss.backward()
                        value = float(loss.detach())
                    opt.step()
                    progress(e * steps + s + 1, epochs * steps, f"finetune epoch {e + 1}/{epochs} loss {value:.4g}")
            run = e + 1
            now = stored()
            finite = all(torch.isfinite(t).all() for d in now.values() for t in d.values())
            value = measure(now) if finite else math.nan
            if not math.isfinite(value):
                reverted = True
                break
            if value < best_loss:
                best, best_loss, best_epoch = now, value, e + 1
    finally:
        for p in train:
            p.grad = None
        for k in norms:
            params[k].requires_grad_(False)
            params[k].data.copy_(norm0[k])
        for p in frozen:
            p.requires_grad_(True)
    out = {m: CodebookWeight(q.codes, best["books"][m].to(STORE_DTYPE).cpu(), best["scales"][m].to(STORE_DTYPE).cpu(),
                             q.in_group, q.bits) for m, q in qws.items()}
    changed = {k: best["norms"][k] for k in norms} if best_epoch else {}
    return out, changed, FinetuneStats(before, best_loss, run, best_epoch, reverted, time.perf_counter() - t0)


def _shard_step(comm, block: torch.nn.Module, call: tuple[tuple, dict], inputs, targets, idx: list[int], lo: int, n_local: int,
                train: list[torch.Tensor], device: torch.device) -> float:
    """One batch over the ranks: this rank's windows of `idx` (global indices) give its part of the
    batch's mean squared error; the gradients of `train` and the loss are summed over the ranks
    in one all-reduce (float32, as one process's backward accumulates) and left in `.grad` (None
    where no rank's share reached the tensor, as in one process); -> the batch's loss."""
    mine = [i - lo for i in idx if lo <= i < lo + n_local]
    if mine:
        x = torch.cat([inputs.sample(i) for i in mine])
        y = torch.cat([targets[i].to(device, torch.float32) for i in mine])
        loss = torch.nn.functional.mse_loss(_forward(block, x, call), y, reduction="sum") / (len(idx) * targets[mine[0]].numel())
        loss.backward()
        value = loss.detach().reshape(1)
    else:  # none of this batch is ours: zeros, still part of the all-reduce
        value = torch.zeros(1)
    reached = torch.tensor([float(p.grad is not None) for p in train])  # a tensor no rank's batch reached keeps no gradient
    flat = torch.cat([value.to(device, torch.float32), reached.to(device),
                      *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in train)])
    comm.all_reduce(flat, what="the fine-tuning gradient all-reduce")
    at = 1 + len(train)
    for j, p in enumerate(train):
        p.grad = flat[at:at + p.numel()].view_as(p).clone() if flat[1 + j] > 0 else None
        at += p.numel()
    return float(flat[0])
