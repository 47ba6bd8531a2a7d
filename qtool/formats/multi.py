"""Quantize once, write many: `qtool quantize MODEL -f gptq,awq,compressed-tensors -o OUT`.

`MultiWriter` stands in front of several writers, so the method runs once and every writer gets the
same QuantizedWeights (writers still own all their packing). The output is one folder, `OUT/`,
holding one complete output per format (`OUT/gptq/`, `OUT/awq/`, ...), each with its model card;
the pipeline renames `OUT` into place only when all of them are finished, so every format appears
complete or not at all.

The layers' layout must suit every writer: where their choices differ (one holds a partial last
group, another needs a smaller group size) the most restrictive choice is taken for all and the
summary says so; a layer that one format keeps in full precision stays so in all. Self-quantizing
formats (GGUF) choose their own per-tensor grids and are run separately by the caller
(`split_formats`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter, GroupChoice, TensorOutcome
from qtool.model.source import CheckpointSource


def parse_formats(spec: str) -> list[str]:
    """`-f a,b,c` -> canonical registry names, in order; unknown or repeated names refused."""
    names = [s.strip() for s in spec.split(",")]
    if any(not n for n in names):
        raise UsageError(f"--format {spec!r}: an empty name in the list")
    canon = [FORMATS.get(n).registry_name for n in names]  # unknown -> UsageError listing the valid ones
    seen: set[str] = set()
    for n, c in zip(names, canon):
        if c in seen:
            raise UsageError(f"--format {spec!r}: {n!r} is listed twice")
        seen.add(c)
    return canon


def options_for(fmt: str, options: dict[str, object]) -> dict[str, object]:
    """The writer options (`--type`, `--double-quant`...) that format `fmt`'s writer takes."""
    params = inspect.signature(FORMATS.get(fmt).__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def check_options_used(formats: list[str], options: dict[str, object]) -> None:
    used = {k for f in formats for k in options_for(f, options)}
    unused = [k for k, v in options.items() if v is not None and k not in used]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UsageError(f"{flags}: not an option of --format {','.join(formats)}")


class MultiWriter(FormatWriter):
    """Several (non-self-quantizing) writers fed by one run; see the module docstring."""

    output_is_dir = True
    self_quantizing = False

    def __init__(self, writers: list[FormatWriter]) -> None:
        super().__init__()
        if any(w.self_quantizing for w in writers) or len(writers) < 2:
            raise ValueError("MultiWriter takes two or more writers that do not quantize by themselves")
        self.writers = writers
        self.registry_name = ",".join(w.registry_name for w in writers)
        self.qtype_kinds = tuple(k for k in writers[0].qtype_kinds if all(k in w.qtype_kinds for w in writers))
        self.partial_groups = all(w.partial_groups for w in writers)
        self.float_zero_points = all(w.float_zero_points for w in writers)
        self.holds_experts = all(w.holds_experts for w in writers)
        self._structure = None

    # the pipeline hands the architecture to the writer before check_plan
    @property
    def structure(self):  # type: ignore[override]
        return self._structure

    @structure.setter
    def structure(self, value) -> None:
        self._structure = value
        for w in getattr(self, "writers", []):
            w.structure = value

    def parts(self, root: Path) -> list[tuple[Path, str]]:
        """(folder, format) of each output inside `root`: where the pipeline writes the model cards."""
        return [(root / w.registry_name, w.registry_name) for w in self.writers]

    def check_recipe(self, recipe: QuantRecipe) -> None:
        for w in self.writers:
            w.check_recipe(recipe)

    def choose_layouts(self, shapes: dict[str, tuple[int, int]], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        per = [(w.registry_name, w.choose_layouts(shapes, recipe)) for w in self.writers]
        out: dict[str, GroupChoice] = {}
        for m in shapes:
            choices = [(name, c[m]) for name, c in per]
            keep = [(name, c) for name, c in choices if c.strategy == "keep"]
            if keep:
                name, c = keep[0]
                out[m] = GroupChoice("keep", None, f"{c.note or 'kept in full precision'} (--format {name}; kept in every format)")
                continue
            strategies = {c.strategy for _, c in choices}
            if len(strategies) > 1:
                raise UnsupportedError(f"{m}: the formats {self.registry_name} need different layouts "
                                       f"({', '.join(f'{n}: {c.strategy}' for n, c in choices)}); write them in separate runs")
            name, c = min(choices, key=lambda nc: nc[1].group_size or 0)
            notes = sorted({x.note for _, x in choices if x.note})
            if any(x.group_size != c.group_size for _, x in choices):
                notes.append(f"group size {c.group_size} for every format ({name} cannot hold more)")
            out[m] = GroupChoice(c.strategy, c.group_size, "; ".join(notes) or None)
        return out

    def spec_options(self, recipe: QuantRecipe) -> dict:
        merged: dict = {}
        for w in self.writers:
            for k, v in w.spec_options(recipe).items():
                if k == "rounding":  # a runtime's own arithmetic: only when every format asks for the same one
                    continue
                if k in merged and merged[k] != v:
                    raise UnsupportedError(f"--format {self.registry_name}: the formats store weights differently ({k}); "
                                           "write them in separate runs")
                merged[k] = v
        roundings = {w.spec_options(recipe).get("rounding") for w in self.writers}
        if len(roundings) == 1 and None not in roundings:
            merged["rounding"] = roundings.pop()
        return merged

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        for w in self.writers:
            w.check_plan(quantized, linears, recipe)

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for sub, w in zip(self.parts(out), self.writers):
            if w.output_is_dir:
                sub[0].mkdir()
            w.begin(sub[0], source, recipe)

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        for w in self.writers:
            w.add_quantized(name, qw)

    def add_tensor(self, name: str, t: torch.Tensor) -> TensorOutcome | None:
        for w in self.writers:
            w.add_tensor(name, t)
        return None

    def finish(self, config: dict, provenance: dict) -> None:
        for w in self.writers:
            w.finish(config, {**provenance, "format": w.registry_name, "formats_written": self.registry_name})

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
