"""Outputs of a block's finished linears, kept between the calibration passes through that block.

True-sequential GPTQ (engine/blockwise.py) runs the block's samples through it once per input group
(q/k/v; o; gate/up; down in a llama block), then once more for the next block's inputs. Once a
group is quantized, its linears' outputs no longer change for the rest of the block: their weights
are final and their inputs come only from what the forward computed before them, that is from
groups quantized earlier (final too). Every later pass recomputed them anyway: in a llama block
q/k/v three more times, o twice, gate/up once, about a third of all forward FLOPs of a GPTQ run.

`LinearMemo` keeps those outputs per (linear, sample, call within the sample) and hands back a copy
instead of recomputing: the tensor the same matmul on the same operands gave before, so every
result downstream is bit-identical to recomputing it (`budget_bytes=0` is that reference path, and
tests/test_block_engine.py compares the two). A method opts in by calling `freeze` on the linears
it has finished; nothing is reused otherwise. Two guards keep a stale output from being served:
a frozen linear's weight is fingerprinted at `freeze` and checked at the start of every pass (a
changed weight drops its outputs), and each stored output is keyed by a fingerprint of the input
it was computed from (a different input is recomputed). Outputs are stored within `budget_bytes`;
past it they are simply recomputed.
"""

from __future__ import annotations

import torch
from torch import nn

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BUDGET_FRACTION = 0.25  # of the memory available when the block starts (engine/activations.py)


def bit_fingerprint(t: torch.Tensor) -> tuple:
    """A cheap fingerprint of a tensor's exact bits (sum of its elements read as integers, shape,
    dtype): any change of a single element changes it."""
    t = t.detach()
    if t.is_floating_point() and t.element_size() in _INT_OF_SIZE:
        t = t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return (tuple(t.shape), str(t.dtype), int(t.sum(dtype=torch.int64)) if not t.is_floating_point() else float(t.sum()))


class LinearMemo:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.used = 0
        self.hits = 0
        self.frozen: dict[nn.Linear, tuple] = {}  # linear -> its weight's fingerprint at freeze
        self.store: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # (linear id, sample, call) -> (input fp, output)
        self._sample = -1
        self._calls: dict[int, int] = {}

    def freeze(self, block: nn.Module, modules) -> None:
        """`modules` (names inside `block`) are final for the rest of this block: their outputs may be
        reused. Only plain nn.Linear modules are memoised (a Tap or other module is left alone)."""
        if self.budget <= 0:
            return
        for m in modules:
            lin = block.get_submodule(m)
            if type(lin) is not nn.Linear or lin in self.frozen:
                continue
            self.frozen[lin] = bit_fingerprint(lin.weight)
            lin.forward = self._forward(lin)  # instance attribute: nn.Module.__call__ still runs its hooks

    def begin_pass(self) -> None:
        """Before a pass over the samples: a frozen linear whose weight changed since `freeze` is
        unfrozen and its outputs dropped."""
        for lin, fp in list(self.frozen.items()):
            if bit_fingerprint(lin.weight) != fp:
                self._unfreeze(lin)

    def begin_sample(self, i: int) -> None:
        self._sample, self._calls = i, {}

    def _forward(self, lin: nn.Linear):
        plain = type(lin).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            call = self._calls.get(id(lin), 0)
            self._calls[id(lin)] = call + 1
            key = (id(lin), self._sample, call)
            fp = bit_fingerprint(x)
            kept = self.store.get(key)
            if kept is not None and kept[0] == fp:
                self.hits += 1
                return kept[1].clone()  # a copy: the caller may change its output in place
            out = plain(lin, x)
            if kept is not None:
                self.used -= kept[1].numel() * kept[1].element_size()
                del self.store[key]
            size = out.numel() * out.element_size()
            if self.used + size <= self.budget:
                self.store[key] = (fp, out.detach().clone())
                self.used += size
            return out

        return forward

    def _unfreeze(self, lin: nn.Linear) -> None:
        self.frozen.pop(lin, None)
        lin.__dict__.pop("forward", None)
        for key in [k for k in self.store if k[0] == id(lin)]:
            t = self.store.pop(key)[1]
            self.used -= t.numel() * t.element_size()

    def close(self) -> None:
        """Forwards restored, outputs freed (the block is done)."""
        for lin in list(self.frozen):
            self._unfreeze(lin)
        self.store.clear()
        self.used = 0


def memo_budget() -> int:
    """Bytes the memo may hold: BUDGET_FRACTION of the memory available now; `QTOOL_MEMO=0` turns
    it off (every pass recomputes, the reference path)."""
    import os

    from qtool.engine.activations import available_memory

    if os.environ.get("QTOOL_MEMO", "").strip() == "0":
        return 0
    return int(BUDGET_FRACTION * available_memory())
