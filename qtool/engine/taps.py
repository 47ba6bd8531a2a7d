"""Checkpoint linears that are not an `nn.Linear` of transformers' built model, made to look like one
for the block-wise engine (hooks, `.weight`, `in_features`), so that calibration methods see them.

Two cases, both found from the architecture (qtool/model/structure.py):

* MoE experts that transformers holds fused in memory (`mlp.experts.gate_up_proj [E, 2I, H]`,
  `down_proj [E, H, I]`) while the checkpoint stores one Linear per expert
  (`mlp.experts.3.gate_proj.weight [I, H]`). A `Tap` at the checkpoint's module path has as
  `weight` the view of the fused parameter that holds that expert's rows (found by passing index
  probes through transformers' own save-time conversion, so no layout is hard-coded), and its
  forward-pre-hooks fire whenever the experts' eager forward calls `F.linear(x, fused[e])`: x is
  the input of exactly the tokens routed to expert e. gate and up share that input (one Hessian).
* a linear whose module path inside the block differs between the checkpoint and the built model
  (mixtral's `block_sparse_moe.gate` is `mlp.gate` in memory): a Tap relays the real module's
  pre-hooks, its `weight` is the real one.

Writing the dequantized weight into `tap.weight` writes into the model's parameter.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from qtool.errors import UnsupportedError


class Tap(torch.nn.Module):
    """Stands for one checkpoint Linear; holds no state of its own (nothing in state_dict)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["weight"] = weight  # a view of the model's parameter, not a parameter itself
        self.out_features, self.in_features = weight.shape

    def fire(self, x: torch.Tensor) -> None:
        for hook in list(self._forward_pre_hooks.values()):
            hook(self, (x,))


class _ExpertCalls(TorchFunctionMode):
    """While the experts' forward runs: `fused[e]` is remembered, and F.linear(x, that) fires the
    taps of (fused, e)."""

    def __init__(self, taps: dict[tuple[int, int], list[Tap]], params: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.taps, self.params = taps, params
        self.picked: dict[int, tuple[int, int]] = {}  # id(fused[e]) -> (id(fused), e)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2 and id(args[1]) in self.picked:
            for tap in self.taps.get(self.picked[id(args[1])], ()):
                tap.fire(args[0])
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.params:
            idx = args[1]
            if isinstance(idx, torch.Tensor) and idx.numel() == 1 or isinstance(idx, int):
                self.picked[id(out)] = (id(args[0]), int(idx))
                self._keep = getattr(self, "_keep", []) + [out]  # ids stay unique while the forward runs
        return out


def _attach(block: torch.nn.Module, path: str, tap: Tap) -> None:
    parent = block
    *heads, last = path.split(".")
    for h in heads:
        if h not in parent._modules:
            parent.add_module(h, torch.nn.Module())
        parent = parent._modules[h]
    parent.add_module(last, tap)


def piece_slice(model, memory_key: str, param: torch.Tensor, ckpt_key: str) -> tuple[int, slice]:
    """(expert, rows) of `param` [E, R, C] that checkpoint tensor `ckpt_key` [rows, C] is, found by
    sending index probes through transformers' save-time conversion of `memory_key`."""
    from qtool.model.structure import revert

    got = []
    for d in range(3):
        shape = [1, 1, 1]
        shape[d] = param.shape[d]
        probe = torch.arange(param.shape[d], dtype=torch.float64).reshape(shape).expand(*param.shape)
        got.append(revert(model, {memory_key: probe})[ckpt_key])
    e, rows, cols = got
    r = rows[:, 0].long()
    ok = (e == e.flatten()[0]).all() and (rows == rows[:, :1]).all() and torch.equal(cols[0].long(), torch.arange(param.shape[2]))
    ok = ok and (cols == cols[:1]).all() and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + len(r)))
    if not ok:
        raise UnsupportedError(f"{ckpt_key}: its rows are not a contiguous slice of the fused {memory_key}; "
                               "calibration cannot follow this expert layout")
    return int(e.flatten()[0]), slice(int(r[0]), int(r[0]) + len(r))


def install(block: torch.nn.Module, root: torch.nn.Module, layout, wanted: dict[str, str]) -> dict[str, str]:
    """Taps in `block` for the wanted checkpoint linears ({checkpoint-relative module: tensor name})
    that are no nn.Linear at that path of the built model. -> {module path inside block: tensor name}."""
    out: dict[str, str] = {}
    expert_taps: dict[tuple[int, int], list[Tap]] = {}
    params: dict[int, torch.Tensor] = {}
    experts_modules: dict[int, torch.nn.Module] = {}
    for rel, tensor in wanted.items():
        existing = _get(block, rel)
        if isinstance(existing, (torch.nn.Linear, Tap)):
            out[rel] = tensor
            continue
        mem_key = layout.linears.get(tensor)
        if mem_key is None:
            raise UnsupportedError(f"{tensor}: no linear of transformers' model computes with this tensor")
        mem_rel = mem_key[len(layout.memory) + 1:]
        owner_path, _, pname = mem_rel.rpartition(".")
        owner = block.get_submodule(owner_path)
        param = getattr(owner, pname)
        if tensor in layout.experts:
            e, rows = piece_slice(root, mem_key, param, tensor)
            tap = Tap(param.data[e, rows])
            expert_taps.setdefault((id(param), e), []).append(tap)
            params[id(param)] = param
            experts_modules[id(owner)] = owner
        else:  # a renamed nn.Linear: relay its pre-hooks
            tap = Tap(owner.weight if isinstance(owner, torch.nn.Linear) and pname == "weight" else param)
            owner.register_forward_pre_hook(lambda mod, args, tap=tap: tap.fire(args[0]))
        _attach(block, rel, tap)
        out[rel] = tensor
    for owner in experts_modules.values():
        _wrap_forward(owner, expert_taps, params)
    return out


def _get(block: torch.nn.Module, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _wrap_forward(module: torch.nn.Module, taps, params) -> None:
    plain = type(module).forward

    def forward(*args, **kwargs):
        with _ExpertCalls(taps, params):
            return plain(module, *args, **kwargs)

    module.forward = forward
