"""GGUF tensors back to the Hugging Face checkpoint they were converted from, by running the
writer's own plan (plan.py) on the Hugging Face model's tensor names and undoing each step:
expert stacks are split per expert, fused gate/up halves and gpt-oss's interleaved rows are put
back together (and transposed back), gemma's norms lose their +1, the Q/K permutation is undone
and DeepSeek's attn_k_b / attn_v_b are merged into kv_b_proj.

Names are those of the checkpoint layout transformers saves (`save_pretrained`): per-expert
`experts.{e}.{gate,up,down}_proj.weight` for the MoE models whose checkpoints are stored so, the
fused 3-D tensors for gpt-oss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf
import torch

from qtool.errors import FormatError
from qtool.formats.gguf import metadata as md
from qtool.formats.gguf.plan import Entry, _Planner, merge_kv_b
from qtool.model.source import TensorMeta

_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def checkpoint_names(shapes: dict[str, tuple[int, ...]], fused_checkpoint: bool) -> dict[str, tuple[int, ...]]:
    """The HF model's state-dict names/shapes -> the saved checkpoint's: transformers' fused 3-D
    experts ([E, 2I, H] gate_up, [E, H, I] down) become per-expert matrices, unless the
    architecture's checkpoints hold them fused (gpt-oss)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        m = _FUSED.match(name)
        if m is None or fused_checkpoint or len(shape) != 3:
            out[name] = shape
            continue
        n_exp = shape[0]
        for e in range(n_exp):
            if m["proj"] == "down_proj":
                out[f"{m['prefix']}.{e}.down_proj.weight"] = shape[1:]
            else:
                half = (shape[1] // 2, shape[2])
                out[f"{m['prefix']}.{e}.gate_proj.weight"] = half
                out[f"{m['prefix']}.{e}.up_proj.weight"] = half
    return out


@dataclass
class Route:
    entry: Entry
    part: int  # which expert of a stack (0 otherwise)


def plan_back(config: dict, spec: md.ArchSpec, hf_shapes: dict[str, tuple[int, ...]], gguf_shapes: dict[str, tuple[int, ...]],
              where: str) -> tuple[dict[str, list[Route]], tuple[str, ...]]:
    """HF name -> the GGUF entries it is made from; plus the GGUF tensors no HF tensor uses."""
    planner = _Planner(config, spec, gguf.GGMLQuantizationType.F32)
    for name, shape in hf_shapes.items():
        planner.add(TensorMeta(name, shape, torch.float32))
    planner.check_complete()
    routes: dict[str, list[Route]] = {}
    for e in planner.entries.values():
        got = gguf_shapes.get(e.name)
        if got is None:
            raise FormatError(f"{where}: GGUF lacks tensor {e.name!r} (for {e.sources[0]})")
        if tuple(got) != tuple(e.shape) and math.prod(got) != math.prod(e.shape):
            raise FormatError(f"{where}: tensor {e.name!r} has shape {tuple(got)}, but {e.sources[0]} needs {e.shape}")
        for i, s in enumerate(e.sources):
            routes.setdefault(s, []).append(Route(e, i))
    unused = tuple(n for n in gguf_shapes if n not in planner.entries)
    missing = [n for n in hf_shapes if n not in routes and n not in planner.skipped]
    if missing:
        raise FormatError(f"{where}: no GGUF tensor for {', '.join(missing[:4])}")
    return routes, unused


def _undo(entry: Entry, v: torch.Tensor) -> torch.Tensor:
    from qtool.model.gguf_source import unpermute_qk_rows

    if entry.transform is None:
        return v
    if entry.transform[0] == "permute":
        return unpermute_qk_rows(v, entry.transform[1])
    if entry.transform[0] == "plus_one":
        return v - 1
    return v


def rebuild(name: str, shape: tuple[int, ...], routes: list[Route], value) -> torch.Tensor:
    """One HF tensor from its GGUF entries; `value(entry)` gives an entry's float32 torch tensor."""
    if routes[0].entry.transform is not None and routes[0].entry.transform[0] == "kv_b":
        parts = {r.entry.transform[1]: value(r.entry) for r in routes}
        return merge_kv_b(parts["k"], parts["v"]).reshape(shape)
    transposed = routes[0].entry.transpose
    full_shape = (*shape[:-2], shape[-1], shape[-2]) if transposed else tuple(shape)
    full = None
    for r in routes:
        v = value(r.entry)
        if len(r.entry.sources) > 1:
            v = v[r.part]
        v = _undo(r.entry, v)
        if r.entry.select is None:
            full = v.reshape(full_shape)
            continue
        if full is None:
            full = torch.empty(full_shape, dtype=v.dtype)
        dim, start, stop, step = r.entry.select
        index = [slice(None)] * full.dim()
        index[dim] = slice(start, stop, step)
        full[tuple(index)] = v
    if full is None:
        raise FormatError(f"no GGUF data for {name}")
    return full.transpose(-1, -2).contiguous() if transposed else full
