"""The validated recipe: everything a run was asked to do, checked before anything is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qtool.devices import check_device
from qtool.errors import UsageError
from qtool.qtypes import BITS_TO_QTYPE, QType, get_qtype

PER_CHANNEL_SPELLINGS = {"channel", "-1", "per-channel"}
PER_TENSOR_SPELLINGS = {"tensor", "per-tensor"}


def parse_group_size(value: str | int | None) -> tuple[str, int | None]:
    """CLI `--group-size` -> (strategy, group_size). `channel` (or -1) is per output channel,
    `tensor` one scale for the whole matrix (fp8 only), N >= 1 groups of N input columns."""
    if value is None:
        return "channel", None
    text = str(value).strip().lower()
    if text in PER_CHANNEL_SPELLINGS:
        return "channel", None
    if text in PER_TENSOR_SPELLINGS:
        return "tensor", None
    try:
        g = int(text)
    except ValueError:
        raise UsageError(f"--group-size {value!r}: expected a positive integer, 'channel' (or -1) or 'tensor'") from None
    if g < 1:
        raise UsageError(f"--group-size {value!r}: must be >= 1 (or 'channel' / -1 for per-channel)")
    return "group", g


@dataclass
class QuantRecipe:
    method: str = "rtn"
    qtype: str = "int4"
    strategy: str = "channel"  # "channel" | "group" | "tensor"
    group_size: int | None = None
    symmetric: bool = True
    format: str = "compressed-tensors"
    targets: list[str] = field(default_factory=list)  # globs over module names; empty = every Linear in the blocks
    ignore: list[str] = field(default_factory=list)
    strict_groups: bool = False  # refuse (instead of adapting) a group size a layer's width does not allow
    device: str = "cpu"
    # calibration (methods with needs_calibration): where the token windows come from
    dataset: str | None = None
    dataset_config: str | None = None  # Hub datasets: config name, split and text field overrides
    split: str | None = None
    text_field: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    stats: str | None = None  # a `qtool calibrate` file whose statistics replace a calibration run
    method_params: dict = field(default_factory=dict)  # the method's own options (gptq: damp, act_order...)
    # --target-bpw / --target-size (qtool/target.py): per-layer types chosen to fit this budget
    target_bpw: float | None = None  # bits per quantized weight, scales and zero points included
    target_size: int | None = None  # bytes of the whole output

    @property
    def weight_type(self) -> QType:
        return get_qtype(self.qtype)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.strategy == "group" else f"per-{self.strategy}"
        sym = "sym" if self.symmetric else "asym"
        return f"{self.method} {self.qtype} {g} {sym}"

    def to_dict(self) -> dict:
        return asdict(self)


def make_recipe(
    *,
    method: str,
    bits: int | None,
    qtype: str | None,
    group_size: str | None,
    asym: bool | None,
    fmt: str,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    strict_groups: bool = False,
    device: str = "cpu",
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    stats: str | None = None,
    method_params: dict | None = None,
    target_bpw: float | None = None,
    target_size: str | int | None = None,
) -> QuantRecipe:
    """Flags -> validated recipe. Checks that need only the flags happen here (exit 2)."""
    if target_bpw is not None and target_size is not None:
        raise UsageError("--target-bpw and --target-size: give one budget")
    if target_bpw is not None and not (0 < target_bpw <= 32):
        raise UsageError(f"--target-bpw {target_bpw}: expected bits per weight in (0, 32]")
    if target_size is not None:
        from qtool.target import parse_size

        target_size = parse_size(str(target_size))
    if qtype is None:
        if bits is None:
            bits = 4
        if bits not in BITS_TO_QTYPE:
            raise UsageError(f"--bits {bits}: choose one of {', '.join(map(str, BITS_TO_QTYPE))} (or --qtype fp8)")
        qtype = BITS_TO_QTYPE[bits]
    qt = get_qtype(qtype)
    if bits is not None and bits != qt.bits:
        raise UsageError(f"--bits {bits} contradicts --qtype {qt.name} ({qt.bits} bits)")
    strategy, g = parse_group_size(group_size)
    if qt.kind == "float":
        if strategy == "group":
            raise UsageError(f"--group-size {g}: {qt.name} is per-channel or per-tensor ('channel' or 'tensor')")
        if asym:
            raise UsageError(f"--asym: {qt.name} is symmetric only")
    elif qt.kind == "lut":  # blockwise absmax scaling: `channel` (the CLI default) means the type's block
        if asym:
            raise UsageError(f"--asym: {qt.name} is a symmetric lookup table (absmax scaling per block)")
        if strategy == "tensor":
            raise UsageError(f"--group-size tensor: {qt.name} takes a block size (default {qt.default_group})")
        if strategy == "channel":
            strategy, g = "group", qt.default_group
    elif strategy == "tensor":
        raise UsageError("--group-size tensor: integer types use 'channel' or a group size, not one scale per tensor")
    from qtool.methods import METHODS
    from qtool.methods.params import resolve

    method_cls = METHODS.get(method)
    if asym is None:  # the method's default grid (AWQ asymmetric, the others symmetric), unless the format has its own grids
        from qtool.formats import FORMATS

        own_grids = fmt in FORMATS and getattr(FORMATS.get(fmt), "self_quantizing", False)
        asym = qt.kind == "int" and not own_grids and not getattr(method_cls, "default_symmetric", True)
    # the method's full option set, validated by its declaration (what recipe files and model cards record)
    params = resolve(method, {k: v for k, v in (method_params or {}).items() if v is not None})
    return QuantRecipe(
        method=method,
        qtype=qt.name,
        strategy=strategy,
        group_size=g,
        symmetric=not asym,
        format=fmt,
        targets=list(targets or []),
        ignore=list(ignore or []),
        strict_groups=strict_groups,
        device=check_device(device),  # a device not present here: exit 2 before loading
        dataset=dataset,
        dataset_config=dataset_config,
        split=split,
        text_field=text_field,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        stats=stats,
        method_params=params,
        target_bpw=target_bpw,
        target_size=target_size,
    )

