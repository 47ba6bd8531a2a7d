"""What a quantization method is: a class registered under its CLI name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from qtool.core.qweight import QuantizedWeight
from qtool.qtypes import QType


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is to be quantized, after the format adapted the recipe to its shape."""

    name: str
    qtype: QType
    strategy: str
    group_size: int | None
    symmetric: bool
    scale_dtype: torch.dtype | None = None  # dtype the scales are stored in; None: the weight's own
    block: tuple[int, int] | None = None  # "block" strategy: rows x columns per scale (fine-grained FP8)
    double_quant: bool = False  # lookup-table types: store the block absmax values in 8 bits (bitsandbytes)
    # RTN only: reproduce a consumer library's own arithmetic bit for bit ("torchao", "quanto":
    # core/peer_rtn.py; "bitsandbytes": its CPU kernel's double-quantization codes, core/lut.py)
    rounding: str | None = None
    kgrid: str | None = None  # GGUF K type of the tensor ("Q4_K"): a method that can tune on its grid does
    codebook: tuple[int, int] | None = None  # "codebook" strategy (AQLM): (codebooks M, bits per code B); group_size: in-group


class QuantMethod(ABC):
    registry_name: str
    params: type = None  # a MethodParams dataclass (below); None: no options of its own
    needs_calibration: bool = False
    supported_kinds: tuple[str, ...] = ("int", "float")
    always_asymmetric: bool = False  # its grid has zero points whatever --asym says (HQQ)

    @abstractmethod
    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        """Quantize one 2-D weight [out, in]; returns the unpacked result."""


# the help of `--amp`, declared by every method whose block forwards may run under bf16 autocast
AMP_HELP = ("Run the block forwards under bf16 autocast, attention through sdpa where it matches eager (weights, sums, solves "
            "and losses stay float32): faster on GPUs and on CPUs with bf16 instructions (AVX512_BF16, AMX), several times "
            "slower on other CPUs.")


# -- method parameters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodParams:
    """A method's own options, declared once as a frozen dataclass whose fields have defaults and a
    `help` in their metadata (`field(default=..., metadata={"help": "..."})`). The declaration drives
    the `qtool quantize` options (`--field-name`, in a help panel per method; see qtool/methods/params.py),
    the `method_params` of a `--recipe` file and of the model card, and the contract tests.
    `__post_init__` validates and raises UsageError naming the option."""


@dataclass(frozen=True)
class NoParams(MethodParams):
    """A method without options of its own."""


# -- the block-level contract -----------------------------------------------------------------------
MethodProgress = Callable[[int, int, str], None]  # (done, total, item): a method's own iterations in a block


@dataclass
class BlockInputs:
    """What a block-level method sees of one decoder block's calibration data.

    `hidden[i]` is sample i's input hidden states [1, L, hidden] (float32): the outputs of the
    blocks before this one *after* they were quantized (sequential). It may live in RAM or be
    memory-mapped from disk (engine/activations.py); `sample(i)` puts it on `device`. `call` are the
    positional and keyword arguments besides the hidden states that the model's own forward passes
    this block (position embeddings, attention mask, cache position...), already on `device`.
    `stats`, with `--stats FILE`, gives the per-linear input statistics of the *unquantized* model
    (a qtool.calib.stats.CalibStats; module names there are full, `prefix + "." + name`); `hidden`
    then holds one short probe sample only, enough to discover the block's structure. `memo`
    (engine/memo.py), set by the engine: the outputs of linears the method declared final with
    `freeze` are reused by later passes instead of recomputed (bit-identical)."""

    prefix: str
    hidden: Sequence[torch.Tensor]
    call: tuple[tuple, dict]
    device: torch.device
    stats: object | None = None
    memo: object | None = None  # engine/memo.py LinearMemo: outputs of linears the method froze, reused
    autocast: torch.dtype | None = None  # `run`'s forwards under this autocast dtype (the method's forward_dtype)

    def __len__(self) -> int:
        return len(self.hidden)

    def sample(self, i: int) -> torch.Tensor:
        return self.hidden[i].to(self.device, torch.float32)

    def freeze(self, block: nn.Module, modules: Iterable[str]) -> None:
        """`modules` (linears of `block`) are final for the rest of this block: quantized, and fed
        only by what is final too (true-sequential: the groups quantized before them). Later passes,
        the engine's forward for the next block's inputs included, may reuse their outputs."""
        if self.memo is not None:
            self.memo.freeze(block, modules)

    def run(self, block: nn.Module, *, samples: Iterable[int] | None = None,
            before_each: Callable[[], None] | None = None, outputs: bool = True) -> list[torch.Tensor | None]:
        """The block on each sample -> its output hidden states per sample (on `device`). Hooks
        registered on the block see every sample; a hook that raises `StopForward` cuts that sample
        short (its output is then None). `before_each` runs before every sample. `outputs=False`: a
        pass run for its hooks only; each output is dropped as soon as it is made (None in the list),
        not held for all samples (on a 1.1 B model, 128 x 512 tokens of them are 0.5 GiB)."""
        args, kwargs = self.call
        outs: list[torch.Tensor | None] = []
        if self.memo is not None:
            self.memo.begin_pass()
        amp = torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)
        with torch.no_grad(), amp:
            for i in (range(len(self)) if samples is None else samples):
                if before_each is not None:
                    before_each()
                if self.memo is not None:
                    self.memo.begin_sample(i)
                try:
                    out = block(self.sample(i), *args, **kwargs)
                except StopForward:
                    outs.append(None)
                    continue
                outs.append((out[0] if isinstance(out, tuple) else out) if outputs else None)
                del out
        return outs


class StopForward(Exception):
    """Raised by a hook to end a block's forward early (the rest of the block is not needed)."""


@dataclass
class BlockResult:
    """What a block-level method returns for one block (module and state-dict names inside it).

    `quantized`: a QuantizedWeight for every linear in `specs`; the engine puts their dequantized
    weights back into the block before computing the next block's inputs. `replaced`: float tensors
    the method changed and that must be written instead of the checkpoint's (AWQ's rescaled norms
    and predecessor linears; for a quantized linear, its changed float weight is what its
    QuantizedWeight approximates and what its error is measured against). `stats`: per-layer
    figures for the run report (JSON-able scalars; e.g. loss). `shares`: module -> the module whose
    input statistics it reused (inputs shared, as q/k/v). `notes`: block-level remarks for the report."""

    quantized: dict[str, QuantizedWeight]
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    shares: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Targets = Sequence[torch.Tensor]


class BlockMethod(QuantMethod):
    """A calibration method that works on a whole decoder block (qtool/engine/block_engine.py).

    The engine calls `quantize_block` once per block, in order, with the block materialised in
    float32 on `--device` (its checkpoint weights, unchanged), its `BlockInputs`, and `specs`
    (module name inside the block -> LayerSpec) for the linears to quantize. With `wants_targets`,
    `targets[i]` is the *float* block's output on sample i of these same inputs (computed by the
    engine before the method runs, stored like the inputs): "what this block would have produced
    unquantized, given what the quantized blocks before it produce". With `target_stream = "model"`
    the targets are instead the unquantized *model's* hidden states after this block (the engine
    carries a second, float stream of activations through the blocks): the method is then asked to
    correct the error the quantized blocks before it left too (AutoRound's target). The method may
    change the block's weights freely while it works; the engine reloads what the result says afterwards."""

    needs_calibration = True
    supported_kinds = ("int",)
    wants_targets: bool = False
    target_stream: str = "block"  # "block": the float block on the quantized inputs; "model": the float model's own stream
    uses_stats: tuple[str, ...] = ()  # with --stats: the statistics it needs ("xtx", "sum_abs"...); () = not usable

    @property
    def forward_dtype(self) -> torch.dtype | None:
        """The dtype of the autocast the block forwards run under (BlockInputs.run: the method's passes
        and the engine's own, float targets and the next block's inputs): bf16 for a method whose
        parameters declare `amp` and have it on (`--amp`, AMP_HELP); None: float32 throughout."""
        return torch.bfloat16 if getattr(getattr(self, "params", None), "amp", False) is True else None

    def quantize(self, w: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
        from qtool.errors import UsageError

        raise UsageError(f"{spec.name}: --method {self.registry_name} works on whole decoder blocks with calibration data "
                         "(`qtool quantize -m ... --dataset ...`)")

    @abstractmethod
    def quantize_block(self, block: nn.Module, inputs: BlockInputs, specs: dict[str, LayerSpec],
                       targets: Targets | None, progress: MethodProgress) -> BlockResult:
        """Quantize the linears of one block; see the class docstring."""
