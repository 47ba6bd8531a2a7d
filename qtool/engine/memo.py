"""Outputs of a block's finished parts, kept between the calibration passes through that block.

True-sequential GPTQ (engine/blockwise.py) runs the block's samples through it once per input group
(q/k/v; o; gate/up; down in a llama block), then once more for the next block's inputs. Once a
group is quantized, its linears' outputs no longer change for the rest of the block: their weights
are final and their inputs come only from what the forward computed before them, that is from
groups quantized earlier (final too). Every later pass recomputed them anyway: in a llama block
q/k/v three more times, the whole attention (o included) twice more, gate/up once more: over half
of the forward FLOPs of a GPTQ run.

`LinearMemo` keeps those outputs per (module, sample, call within the sample) and hands back a
copy instead of recomputing: the tensors the same operations on the same operands gave before, so
everything downstream is bit-identical to recomputing them (`budget_bytes=0` is that reference
path; tests/test_linear_memo.py compares the two). A method opts in by calling `freeze` on the
linears it has finished; a submodule of the block (a llama block's `self_attn`) is frozen with
them once every nn.Linear inside it is. Nothing is reused otherwise.

Two guards keep a stale output from being served: the parameters and buffers of a frozen module
are fingerprinted at `freeze` and checked at the start of every pass (a change drops its outputs),
and each stored output is keyed by a fingerprint of the inputs it was computed from, every tensor
of its arguments (a different input is recomputed). Outputs are stored within `budget_bytes`; past
it they are recomputed. `QTOOL_MEMO=0` turns the memo off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

BUDGET_FRACTION = 0.25  # of the memory available when the block starts (engine/activations.py)


def bit_fingerprint(t: torch.Tensor) -> tuple:
    """A cheap fingerprint of a tensor's exact bits: the wrapping sum of its bytes read as 64-bit
    integers (the odd tail bytes summed apart), with shape, dtype and device. A change of any
    single element changes it."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = flat.numel() // 8 * 8
    words = int(flat[:whole].view(torch.int64).sum()) if whole else 0
    tail = int(flat[whole:].sum(dtype=torch.int64)) if whole < flat.numel() else 0
    return (tuple(t.shape), str(t.dtype), str(t.device), words, tail)


def _args_fingerprint(obj) -> object:
    if isinstance(obj, torch.Tensor):
        return bit_fingerprint(obj)
    if isinstance(obj, (tuple, list)):
        return tuple(_args_fingerprint(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _args_fingerprint(v)) for k, v in obj.items())
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return _Same(obj)


class _Same:
    """Equal only to a wrapper of the very same object (kept alive here, so its id is not reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    __hash__ = None  # type: ignore[assignment]


def _copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_copy(o) for o in obj)
    if isinstance(obj, list):
        return [_copy(o) for o in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(type(obj).__name__)  # an output we cannot copy: not memoised


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _state_fingerprint(mod: nn.Module) -> tuple:
    return tuple(bit_fingerprint(t) for t in [*mod.parameters(), *mod.buffers()])


class LinearMemo:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.used = 0
        self.hits = 0
        self.frozen: dict[nn.Module, tuple] = {}  # module -> fingerprint of its parameters and buffers at freeze
        self.store: dict[tuple, tuple[object, object]] = {}  # (module id, sample, call) -> (inputs fp, output)
        self._inside: dict[int, list[int]] = {}  # frozen submodule id -> ids of the frozen modules inside it
        self._sample = -1
        self._calls: dict[int, int] = {}

    def freeze(self, block: nn.Module, modules) -> None:
        """`modules` (names inside `block`) are final for the rest of this block: their outputs may be
        reused. Plain nn.Linear modules are memoised (a Tap or other module is left alone), and with
        them every submodule of `block` whose nn.Linear modules are all frozen now."""
        if self.budget <= 0:
            return
        for m in modules:
            lin = block.get_submodule(m)
            if type(lin) is nn.Linear and lin not in self.frozen and "forward" not in lin.__dict__:
                self._freeze(lin)
        for name, sub in block.named_modules():
            if not name or sub in self.frozen or "forward" in sub.__dict__ or isinstance(sub, nn.Linear):
                continue
            inner = [m for m in sub.modules() if m is not sub]
            linears = [m for m in inner if isinstance(m, nn.Linear)]
            if linears and all(m in self.frozen for m in linears) and not any(type(m).__name__ == "Tap" for m in inner):
                self._inside[id(sub)] = [id(m) for m in inner if m in self.frozen]
                self._freeze(sub)

    def _freeze(self, mod: nn.Module) -> None:
        self.frozen[mod] = _state_fingerprint(mod)
        mod.forward = self._forward(mod)  # instance attribute: nn.Module.__call__ still runs its hooks

    def begin_pass(self) -> None:
        """Before a pass over the samples: a frozen module whose parameters or buffers changed since
        `freeze` is unfrozen and its outputs dropped."""
        for mod, fp in list(self.frozen.items()):
            if _state_fingerprint(mod) != fp:
                self._unfreeze(mod)

    def begin_sample(self, i: int) -> None:
        self._sample, self._calls = i, {}

    def _forward(self, mod: nn.Module):
        plain = type(mod).forward

        def forward(*args, **kwargs):
            call = self._calls.get(id(mod), 0)
            self._calls[id(mod)] = call + 1
            key = (id(mod), self._sample, call)
            fp = _args_fingerprint((args, kwargs))
            kept = self.store.get(key)
            if kept is not None and kept[0] == fp:
                self.hits += 1
                return _copy(kept[1])  # a copy: the caller may change its output in place
            out = plain(mod, *args, **kwargs)
            self._drop(key)
            try:
                saved = _copy(out)
            except TypeError:
                return out
            size = _nbytes(saved)
            if self.used + size <= self.budget:
                self.store[key] = (fp, saved)
                self.used += size
                for inner in self._inside.get(id(mod), ()):  # served from here from now on
                    for k in [k for k in self.store if k[0] == inner and k[1] == self._sample]:
                        self._drop(k)
            return out

        return forward

    def _drop(self, key: tuple) -> None:
        kept = self.store.pop(key, None)
        if kept is not None:
            self.used -= _nbytes(kept[1])

    def _unfreeze(self, mod: nn.Module) -> None:
        self.frozen.pop(mod, None)
        self._inside.pop(id(mod), None)
        mod.__dict__.pop("forward", None)
        for key in [k for k in self.store if k[0] == id(mod)]:
            self._drop(key)

    def close(self) -> None:
        """Forwards restored, outputs freed (the block is done)."""
        for mod in list(self.frozen):
            self._unfreeze(mod)
        self.store.clear()
        self.used = 0


def memo_budget() -> int:
    """Bytes the memo may hold: BUDGET_FRACTION of the memory available now; `QTOOL_MEMO=0` turns
    it off (every pass recomputes, the reference path)."""
    from qtool.engine.activations import available_memory

    if os.environ.get("QTOOL_MEMO", "").strip() == "0":
        return 0
    return int(BUDGET_FRACTION * available_memory())
