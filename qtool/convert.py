"""`qtool export QUANTIZED -f OTHER`: lossless repacks between the quantized layouts qtool reads
and writes (GPTQ, AWQ, AutoRound's native format, compressed-tensors), where their grids agree.

The stored codes, scales and zero points go to the new writer unchanged; the writer only packs
them its own way (GPTQ v1 <-> v2 zero points, AWQ nibble order, compressed-tensors' offsets). What
the target cannot hold (another bit width, a partial group, an act-order group map, a group size
its loaders refuse) is refused before anything is written, naming the layer and the reason:
requantizing would change the codes, which this command promises not to do.
"""

from __future__ import annotations

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError
from qtool.formats.base import FormatWriter
from qtool.methods.base import LayerSpec, QuantMethod
from qtool.model.quantized_source import QuantizedSource
from qtool.model.source import block_of

G_IDX_FORMATS = ("gptq",)  # targets whose layout stores a per-column group map
FP16_SCALE_FORMATS = ("gptq", "awq", "auto-round")  # targets that store scales in float16


class KeepStored(QuantMethod):
    """The 'method' of a repack: each layer's stored QuantizedWeight, as read."""

    registry_name = "repack"

    def __init__(self, source: QuantizedSource, fp16_scales: bool = False) -> None:
        self.source, self.fp16_scales = source, fp16_scales

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        qw = self.source.quantized(spec.name)
        if self.fp16_scales and not torch.equal(qw.scale.to(torch.float16).to(qw.scale.dtype), qw.scale):
            bad = int((qw.scale.to(torch.float16).to(qw.scale.dtype) != qw.scale).sum())
            raise UnsupportedError(f"{spec.name}: {bad} scale(s) are not exact in float16, which the target stores; "
                                   "the repack would not be lossless (use --format compressed-tensors)")
        if not spec.symmetric and qw.zero_point is None:  # one scheme per model: explicit zero points of 0
            qw.zero_point = torch.zeros(qw.scale.shape, dtype=torch.int8)
        return qw


def _scheme(source: QuantizedSource, prefix: str) -> tuple:
    """(bits, strategy, group_size, symmetric, has_group_map) of one module, from config and the
    small tensors (zero points, g_idx) only."""
    layout = source.layout
    if layout.tensors == "compressed-tensors":
        from qtool.formats.compressed_tensors import scheme_for

        args = scheme_for(prefix, source.qconfig) or {}
        if args.get("type") != "int":
            raise UnsupportedError(f"{prefix}: {args.get('type', '?')} weights are not integer codes; only --format compressed-tensors holds them")
        parts = source.parts[prefix]
        return (int(args["num_bits"]), args["strategy"], args.get("group_size"), bool(args.get("symmetric", True)), "weight_g_idx" in parts)
    g = int(layout.group_size or -1)
    strategy, group = ("channel", None) if g == -1 else ("group", g)
    parts = source.parts[prefix]
    g_map = False
    if "g_idx" in parts:
        g_idx = source.inner.get_tensor(parts["g_idx"]).long()
        g_map = not torch.equal(g_idx, torch.arange(g_idx.numel()) // (g_idx.numel() if g == -1 else g))
    symmetric = layout.symmetric if layout.tensors == "gptq" and layout.symmetric is not None else None
    if symmetric is None:  # zero points decide (reads qzeros only): all at 2^(b-1) is symmetric
        qw_z = _zero_points(source, prefix)
        symmetric = not qw_z.any()
    return (layout.bits_for(prefix), strategy, group, bool(symmetric), g_map)


def _zero_points(source: QuantizedSource, prefix: str) -> torch.Tensor:
    from qtool.core.packing import unpack_awq_order, unpack_bits

    layout, parts = source.layout, source.parts[prefix]
    bits = layout.bits_for(prefix)
    qzeros = source.inner.get_tensor(parts["qzeros"])
    out_f = source.inner.meta(parts["scales"]).shape[1]
    if layout.tensors == "awq":
        z = unpack_awq_order(qzeros, out_f)
    else:
        z = unpack_bits(qzeros, bits, out_f, dim=1) + (1 if layout.tensors == "gptq" else 0)
    return z - 2 ** (bits - 1)


def plan_repack(source: QuantizedSource, writer: FormatWriter) -> tuple[QuantRecipe, KeepStored]:
    """The recipe that describes what is stored, checked against `writer`, and the method that
    hands the stored weights over. Raises UnsupportedError, before anything is written, where the
    codes cannot be kept."""
    from qtool.pipeline import module_of, select_layers

    name = writer.registry_name
    modules = source.quantized_modules()
    if not modules:
        raise UnsupportedError(f"{source.path}: no quantized layer found to repack")
    schemes = {m: _scheme(source, m) for m in modules}
    grids = {s[:3] for s in schemes.values()}
    if len(grids) > 1:
        a, b = sorted(grids, key=str)[:2]
        raise UnsupportedError(f"{source.path}: layers use different schemes ({_grid(a)} and {_grid(b)}); "
                               f"--format {name} holds one per model, so the codes cannot be kept")
    bits, strategy, group = grids.pop()
    symmetric = all(s[3] for s in schemes.values())
    mapped = [m for m, s in schemes.items() if s[4]]
    if mapped and name not in G_IDX_FORMATS:
        raise UnsupportedError(f"layer {mapped[0]}: act-order group map (g_idx); --format {name} cannot hold it, so the codes cannot be kept")
    linears = [module_of(m.name) for m in source.tensors() if m.name.endswith(".weight") and len(m.shape) == 2]
    in_blocks = [m for m in linears if block_of(m + ".")]
    chosen = set(modules)
    recipe = QuantRecipe(method="repack", qtype=f"int{bits}", strategy=strategy, group_size=group, symmetric=symmetric,
                         format=name, strict_groups=True)
    if chosen <= set(in_blocks):
        recipe.ignore = [m for m in in_blocks if m not in chosen and m in {module_of(t.name) for t in select_layers(source.tensors(), recipe)}]
    else:
        recipe.targets = sorted(chosen)
    selected = {module_of(t.name) for t in select_layers(source.tensors(), recipe)}
    if selected != chosen:
        odd = sorted(selected ^ chosen)[0]
        raise UnsupportedError(f"layer {odd}: the quantized layers of {source.path} cannot be selected exactly for a repack")
    widths = {m.name[: -len(".weight")]: m.shape[1] for m in source.tensors() if module_of(m.name) in chosen}
    try:
        writer.check_recipe(recipe)
        writer.check_plan(chosen, linears, recipe)
        writer.choose_groups(widths, recipe)
    except UnsupportedError as e:
        raise UnsupportedError(f"codes of {source.layout.label} cannot be kept in --format {name}: {e}") from None
    source.dtype = torch.float32  # the pipeline's per-layer error then compares like with like: lossless is +inf dB
    return recipe, KeepStored(source, name in FP16_SCALE_FORMATS)


def _grid(s: tuple) -> str:
    bits, strategy, group = s
    return f"int{bits} " + (f"g{group}" if strategy == "group" else strategy)
