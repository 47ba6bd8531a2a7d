"""What an output format is: a writer that declares what it can hold, checks a recipe cheaply
(before anything is loaded), adapts per-layer group sizes to what its consumer accepts, and
writes atomically (the pipeline hands it a temporary path)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.grouping import divisors_for_groups
from qtool.core.qweight import QuantizedWeight
from qtool.errors import UnsupportedError, UsageError
from qtool.model.source import CheckpointSource


@dataclass(frozen=True)
class GroupChoice:
    strategy: str  # "keep": the format leaves this layer in full precision (`note` says why)
    group_size: int | None
    note: str | None = None  # set when the format changed what was asked, shown in the summary


@dataclass(frozen=True)
class TensorOutcome:
    """What a self-quantizing writer (GGUF) did with one tensor, for the run report."""

    qtype: str  # e.g. "Q4_K"
    storage_bits: int  # bits written for this tensor (codes, scales, mins)
    sqnr_db: float
    note: str | None = None  # e.g. a fallback type, shown in the summary


class FormatWriter(ABC):
    registry_name: str
    output_is_dir: bool = True
    qtype_kinds: tuple[str, ...] = ("int", "float")  # which weight types it can hold
    partial_groups: bool = False  # can it hold a last group narrower than the group size?
    quantizes: bool = True  # False for plain (unquantized) formats
    # True when the format quantizes float tensors itself, with its own block types and per-tensor
    # rules (GGUF): the pipeline then hands it every tensor unquantized, through add_tensor().
    self_quantizing: bool = False
    # True when the format stores float zero points (HQQ's); others get them rounded (core/qweight.py)
    float_zero_points: bool = False

    def __init__(self, **options: object) -> None:
        """Format-specific options (`--type`, `--dtype`); a writer that takes none refuses any."""
        given = [k for k, v in options.items() if v is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"{flags}: not an option of --format {self.registry_name}")

    def check_recipe(self, recipe: QuantRecipe) -> None:
        """Refuse a combination from the flags alone (exit 3), before loading anything."""
        kind = recipe.weight_type.kind
        if self.quantizes and kind not in self.qtype_kinds:
            raise UnsupportedError(f"--format {self.registry_name} cannot hold {recipe.qtype} weights")

    def choose_layouts(self, shapes: dict[str, tuple[int, int]], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        """The layout of every layer to quantize ({module: (out, in)} -> choice); formats whose
        tiles span rows too (fine-grained FP8) override this, the others `choose_groups`."""
        return self.choose_groups({m: s[1] for m, s in shapes.items()}, recipe)

    def choose_groups(self, widths: dict[str, int], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        """The group layout of every layer to quantize ({module: input width} -> choice).

        Where the format holds a partial last group, or the group size divides every width, the
        request stands. Otherwise the whole model gets one smaller power-of-two group size that
        divides every width: one scheme per model is what every loader handles (transformers'
        dequantize route and its MoE experts path take a single config group). `--strict-groups`,
        or no such size, is an error naming a layer and the sizes that would work."""
        g = recipe.group_size
        asked = {m: GroupChoice(recipe.strategy, g) for m in widths}
        if recipe.strategy != "group" or self.partial_groups:
            return asked
        misfits = {m: w for m, w in widths.items() if w % g}  # type: ignore[operator]
        if not misfits:
            return asked
        layer, width = next(iter(misfits.items()))
        common = [d for d in divisors_for_groups(min(widths.values())) if all(w % d == 0 for w in widths.values())]
        smaller = [d for d in common if d < g]  # type: ignore[operator]
        if recipe.strict_groups or not smaller:
            options = divisors_for_groups(width)
            hint = f"group sizes that divide it: {', '.join(map(str, options))}" if options else "use --group-size channel"
            raise UnsupportedError(
                f"layer {layer}: input width {width} is not a multiple of --group-size {g} and "
                f"--format {self.registry_name} cannot hold a partial group; {hint}"
            )
        note = f"group size {smaller[-1]} instead of {g}: {width} ({layer}) is not a multiple of {g}"
        return {m: GroupChoice("group", smaller[-1], note) for m in widths}

    def spec_options(self, recipe: QuantRecipe) -> dict:
        """LayerSpec fields the format fixes for every layer (scale dtype, FP8 blocks, double quant)."""
        return {}

    def describe(self) -> str | None:
        """The format's own type choice for the run report (GGUF: the mixture), if any."""
        return None

    structure = None  # the model's architecture (qtool/model/structure.py), given before check_plan
    holds_experts: bool = True  # can its consumer load per-expert MoE linears quantized?

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:  # noqa: B027
        """Refuse, before any weight is read, a selection of layers the consumer cannot load."""

    @abstractmethod
    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        """Start writing into `out` (a temporary folder or file path)."""

    @abstractmethod
    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        """`name` is the weight's tensor name, e.g. `model.layers.0.mlp.up_proj.weight`."""

    @abstractmethod
    def add_tensor(self, name: str, t: torch.Tensor) -> TensorOutcome | None:
        """A tensor not quantized by the method (embeddings, norms, biases, ignored layers). A
        self-quantizing writer may quantize it and say how in the returned outcome."""

    @abstractmethod
    def finish(self, config: dict, provenance: dict) -> None:
        """Write config / metadata and close. `provenance` records how the artifact was made."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Release resources after a failure; the pipeline deletes the temporary path."""


def write_folder_files(out: Path, source: CheckpointSource, config: dict, provenance: dict, **qtool_extra: object) -> None:
    """The files beside the weights of a folder format: config.json, the source's tokenizer and
    generation files, and qtool.json (provenance, plus the format's own record)."""
    import json

    from qtool import __version__

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    source.write_aux_files(out)
    (out / "qtool.json").write_text(json.dumps({"qtool_version": __version__, **provenance, **qtool_extra}, indent=2) + "\n")
