"""Where AWQ can fold a per-input-channel scale s: found in the module graph, never from names.

A group of linears fed one input tensor x (q/k/v, gate/up...) is scaled as W·diag(s), and its
input must become x / s with the block's function unchanged. A *fold* is a change of some
earlier module that does exactly that:

  "norm"   a module producing x itself, with a 1-D `weight` (and optional `bias`) of x's width:
           weight / s, bias / s (RMSNorm, LayerNorm: out = f(h) · w + b);
  "norm1p" the same module where the weight enters as (1 + w) (Gemma's RMSNorm): (1 + w') =
           (1 + w) / s, i.e. w' = (1 + w) / s - 1, bias / s;
  "rows"   an earlier nn.Linear in the block with x's width as its output, whose output reaches x
           only through per-channel-linear operations (v → attention → o; up · act(gate) → down):
           its rows (and bias) / s.

Candidates come from one probe forward (forward hooks name the module whose output *is* x;
pre-hooks give the order in which linears run). Each candidate and kind is then *verified*: the
fold is applied with a random s, the block rerun on the probe sample up to the group, and x must
come out as x / s (relative error RTOL). The first candidate that passes is the fold; a group
with none gets clipping only (the caller reports which).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.methods.base import BlockInputs, StopForward

RTOL = 1e-4  # relative error of x' against x / s that still counts as a fold (float32 round-off is ~1e-7)


@dataclass(frozen=True)
class Fold:
    target: str  # module name inside the block
    kind: str  # "norm" | "norm1p" | "rows"

    def keys(self, block: nn.Module) -> list[str]:
        mod = block.get_submodule(self.target)
        return [f"{self.target}.{p}" for p in ("weight", "bias") if getattr(mod, p, None) is not None]

    def folded(self, block: nn.Module, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """The target's new tensors (state-dict names inside the block) for scale s; nothing changed in place."""
        mod = block.get_submodule(self.target)
        w = mod.weight.detach().float()
        s = s.to(w.device, torch.float32)
        if self.kind == "norm":
            new_w = w / s
        elif self.kind == "norm1p":
            new_w = (1 + w) / s - 1
        else:
            new_w = w / s.unsqueeze(1)
        out = {f"{self.target}.weight": new_w}
        if getattr(mod, "bias", None) is not None:
            out[f"{self.target}.bias"] = mod.bias.detach().float() / s
        return out


def _assign(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in tensors.items():
            mod, _, attr = k.rpartition(".")
            getattr(block.get_submodule(mod), attr).copy_(t)


class _Probe:
    """One forward on sample 0: which leaf module produced each tensor, each group's input, the linears' order."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, firsts: list[str]) -> None:
        self.producer: dict[tuple, str] = {}  # latest leaf output at each (address, shape, stride)
        self.x: dict[str, torch.Tensor] = {}
        self.made_by: dict[str, str | None] = {}  # group's first linear -> leaf module whose output is its input
        self.order: list[str] = []
        handles = []
        for name, mod in block.named_modules():
            if name and not any(True for _ in mod.children()):
                handles.append(mod.register_forward_hook(self._out_hook(name)))
            if isinstance(mod, nn.Linear):
                handles.append(mod.register_forward_pre_hook(self._in_hook(name, name in firsts)))
        try:
            inputs.run(block, samples=[0])
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride())

    def _out_hook(self, name: str):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                self.producer[self.key(out)] = name

        return hook

    def _in_hook(self, name: str, keep: bool):
        def hook(mod, args):
            if name not in self.order:
                self.order.append(name)
            if keep and name not in self.x:  # looked up now, while x is alive (addresses are reused later)
                self.x[name] = args[0]
                self.made_by[name] = self.producer.get(self.key(args[0]))

        return hook


def _group_input(block: nn.Module, inputs: BlockInputs, first: str) -> torch.Tensor:
    got: list[torch.Tensor] = []

    def hook(mod, args):
        got.append(args[0].detach().clone())
        raise StopForward

    h = block.get_submodule(first).register_forward_pre_hook(hook)
    try:
        inputs.run(block, samples=[0])
    finally:
        h.remove()
    return got[0]


def verify(block: nn.Module, inputs: BlockInputs, first: str, fold: Fold, x: torch.Tensor) -> bool:
    """Does `fold` with a random s turn the group's input x into x / s?"""
    width = x.shape[-1]
    g = torch.Generator().manual_seed(width)
    s = (0.5 + 1.5 * torch.rand(width, generator=g)).to(x.device)
    saved = {k: t.detach().clone() for k, t in block.state_dict().items() if k in fold.keys(block)}
    try:
        _assign(block, fold.folded(block, s))
        x2 = _group_input(block, inputs, first)
    finally:
        _assign(block, saved)
    want = x / s
    return bool((x2 - want).norm() <= RTOL * want.norm())


def candidates(block: nn.Module, probe: _Probe, first: str, group: list[str]) -> list[Fold]:
    x = probe.x.get(first)
    if x is None:
        return []
    width = x.shape[-1]
    out: list[Fold] = []
    prod = probe.made_by.get(first)
    if prod is not None and prod not in group:
        w = getattr(block.get_submodule(prod), "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == width and not isinstance(block.get_submodule(prod), nn.Linear):
            out += [Fold(prod, "norm"), Fold(prod, "norm1p")]
    for name in probe.order[: probe.order.index(first)]:
        lin = block.get_submodule(name)
        if name not in group and lin.out_features == width:
            out.append(Fold(name, "rows"))
    return out


def discover_folds(block: nn.Module, inputs: BlockInputs, groups: list[list[str]]) -> dict[str, Fold | None]:
    """{first linear of each group: its verified fold, or None (clipping only)}."""
    firsts = [g[0] for g in groups]
    probe = _Probe(block, inputs, firsts)
    found: dict[str, Fold | None] = {}
    for group in groups:
        first = group[0]
        found[first] = None
        for fold in candidates(block, probe, first, group):
            if verify(block, inputs, first, fold, probe.x[first].detach()):
                found[first] = fold
                break
    return found
