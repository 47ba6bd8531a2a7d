"""`--target-bpw` / `--target-size` for the folder formats that hold a bit-width per layer
(compressed-tensors: one config group per scheme; GPTQ: the `dynamic` per-module overrides that
GPTQModel reads): each planned layer's integer width chosen among BITS by qtool/target.py's solver,
at the recipe's group size and symmetry.

Cost per layer and width: with `--target-bpw`, the bits the run report counts for it (codes, scales,
zero points: estimate.layer_bits, exact); with `--target-size`, the bytes the format packs it into
(estimate.format_layer_bytes) plus the unquantized tensors and the small files as the dry run
estimates them (a few kB of slack). Error: the layer's importance-weighted round-to-nearest error
on sampled rows, importance = mean x² per input column from `--stats` (a `qtool calibrate` file)
when given; calibration methods (GPTQ...) then lower every layer's error, roughly in proportion.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qtool import estimate as est
from qtool.errors import UnsupportedError, UsageError
from qtool.methods.base import LayerSpec
from qtool.model.source import CheckpointSource
from qtool.qtypes import get_qtype
from qtool.target import Target, choose, proxy_error, sample_rows, small_work, weighted_error

BITS = (2, 3, 4, 8)


def widths_for(fmt: str, shape: tuple[int, int]) -> list[int]:
    """The widths `fmt` can hold for a layer of this shape."""
    if fmt == "gptq" and (shape[0] % 32 or shape[1] % 32):
        return [b for b in BITS if b != 3]  # GPTQModel unpacks 3-bit codes 32 at a time
    return list(BITS)


def allocate_bits(source: CheckpointSource, recipe, formats: list[str], specs: dict[str, LayerSpec], target: Target,
                  *, proxy: bool = False) -> tuple[dict[str, LayerSpec], str]:
    """`specs` (tensor name -> LayerSpec at the recipe's width) with each layer's width chosen;
    returns them and a note for the run report."""
    if not recipe.weight_type.is_int:
        raise UsageError(f"{target.flag()}: chooses integer bit-widths; --qtype {recipe.qtype} is not one")
    if target.size is not None and len(formats) > 1:
        raise UsageError(f"{target.flag()} with --format {','.join(formats)}: each format packs differently; "
                         "give --target-bpw")
    from qtool.formats.compressed_tensors import EXPERT_RE

    experts = [n for n in specs if EXPERT_RE.match(n)]
    if experts and "compressed-tensors" in formats:
        raise UnsupportedError(f"{target.flag()}: transformers loads compressed-tensors MoE experts with one scheme "
                               f"for all of them (e.g. {experts[0]}); use one --bits for MoE models")
    metas = {m.name: m for m in source.tensors()}
    importance = _importance(recipe, source, specs)
    with small_work():
        names, costs, errors, labels, options = _candidates(source, formats, specs, target, importance, metas, proxy)
    return _choose(names, costs, errors, labels, options, source, specs, metas, formats, target, proxy)


def _candidates(source, formats, specs, target, importance, metas, proxy):
    """Per layer: its widths' costs, errors, labels and specs."""
    rtn = _rtn()
    names, costs, errors, labels, options = [], [], [], [], []
    for name, spec in specs.items():
        m = metas[name]
        shape = tuple(m.shape)
        widths = sorted(set.intersection(*[set(widths_for(f, shape)) for f in formats]))
        cands = [replace(spec, qtype=get_qtype(f"int{b}")) for b in widths]
        names.append(name)
        options.append(cands)
        labels.append([f"int{b}" for b in widths])
        if target.bpw is not None:
            costs.append([est.layer_bits(shape, s, m.dtype) for s in cands])
        else:
            costs.append([est.format_layer_bytes(formats[0], shape, s, m.dtype) for s in cands])
        imp = importance.get(name)
        if proxy:
            mi = 1.0 if imp is None else float(imp.mean())
            errors.append([proxy_error(lambda x, s=s: rtn.quantize(x, s).dequantize(torch.float32), m.numel, mi,
                                       spec.group_size if spec.strategy == "group" else None) for s in cands])
        else:
            rows, scale = sample_rows(source.get_tensor(name))
            errors.append([weighted_error(rows, rtn.quantize(rows, s).dequantize(torch.float32), imp) * scale for s in cands])
    return names, costs, errors, labels, options


def _choose(names, costs, errors, labels, options, source, specs, metas, formats, target, proxy):
    if target.bpw is not None:
        numel = sum(metas[n].numel for n in names)
        budget = int(target.bpw * numel)
        units, unit = (lambda c: c / numel), "bits per weight"
    else:
        rest = sum(m.numel * m.dtype.itemsize for n, m in metas.items() if n not in specs)
        fixed = rest + est.ST_ENTRY * (len(metas) + 3 * len(specs)) + est.SMALL_FILES + _aux_bytes(source)
        budget = target.size - fixed  # type: ignore[operator]
        units, unit = (lambda c: c + fixed), "bytes (estimated)"
    choice = choose(names, costs, errors, labels, budget, target, to_target_units=units, unit=unit, proxy=proxy)
    chosen = {n: options[i][choice.types[n]] for i, n in enumerate(names)}
    note = choice.note
    if "gptq" in formats and len({s.qtype.bits for s in chosen.values()}) > 1:
        note += ("; gptq: the other widths are GPTQModel `dynamic` overrides, which GPTQModel.load and vLLM read; "
                 "transformers' from_pretrained (optimum 2.3) ignores them and refuses the checkpoint")
    return chosen, note


def _rtn():
    from qtool.methods import METHODS

    return METHODS.get("rtn")()


def _importance(recipe, source: CheckpointSource, specs: dict) -> dict[str, torch.Tensor]:
    """Mean x² per input column for each layer, from `--stats` (empty without)."""
    if not recipe.stats:
        return {}
    from pathlib import Path

    from qtool.calib.stats import CalibStats
    from qtool.pipeline import module_of

    stats = CalibStats(Path(recipe.stats))
    stats.check_model(source.config, {n: m.shape for n, m in ((m.name, m) for m in source.tensors()) if n in specs})
    out = {}
    for name in specs:
        mod = module_of(name)
        out[name] = stats.vector(mod, "sum_x2") / max(stats.tokens(mod), 1)
    return out


def _aux_bytes(source: CheckpointSource) -> int:
    from qtool.model.safetensors_source import AUX_FILES

    folder = source.path if source.path.is_dir() else source.path.parent
    return sum((folder / n).stat().st_size for n in AUX_FILES if (folder / n).is_file())


def check_format(writer) -> list[str]:
    """The formats of a (multi-)writer, refused unless each holds a width per layer."""
    writers = getattr(writer, "writers", [writer])
    bad = [w.registry_name for w in writers if not getattr(w, "mixed_bits", False)]
    if bad:
        raise UnsupportedError(f"--target-bpw/--target-size: --format {bad[0]} holds one bit-width per model; "
                               "compressed-tensors, gptq and gguf hold one per layer")
    return [w.registry_name for w in writers]
