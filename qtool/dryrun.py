"""`qtool quantize ... --dry-run`: the run planned from headers and flags, nothing quantized,
downloaded (beyond config, tokenizer and the safetensors headers of a Hub repo) or written.

It walks the real run's steps in the real order and collects, instead of stopping at, every
refusal they would raise: the push check, the output already existing, `--resume` without a
checkpoint, opening the model, its architecture and tensor names, then per output format the
layer plan (group sizes adapted, layers a format keeps), `--stats`, the calibration data and
tokenizer, and the writer's own setup: `begin()` runs for real into a scratch folder in the
system temp directory, deleted before returning, so its refusals are the run's exactly (GGUF:
its metadata and tokenizer, written there, also give the header's exact size). What it cannot
see: refusals that depend on weight values (NaN/Inf, a scale overflowing float16) and whether a
calibration set holds samples x seq_len tokens (known once tokenized). Estimates: qtool/estimate.py.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from qtool import estimate as est
from qtool.config import QuantRecipe
from qtool.errors import QtoolError, UnsupportedError
from qtool.formats.base import FormatWriter
from qtool.methods import METHODS
from qtool.model.source import CheckpointSource


@dataclass
class Refusal:
    stage: str  # which step of the run raises it
    exit_code: int
    message: str
    format: str | None = None


@dataclass
class RunPlan:
    """One output of the run: what is quantized, how, and how big the output would be."""

    format: str
    output: str
    format_type: str | None = None  # GGUF: the mixture / target
    layers: list[dict] = field(default_factory=list)  # name, shape, type, bits
    notes: list[str] = field(default_factory=list)
    params_quantized: int = 0
    bits_quantized: int = 0
    output_bytes: int | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # several formats in one run: bytes per format
    setup_seconds: float = 0.0  # the writer's begin(), timed in the scratch run (GGUF: metadata and tokenizer)
    refusal: Refusal | None = None
    specs: dict = field(default_factory=dict, repr=False)  # tensor name -> LayerSpec, for the estimates

    @property
    def bpw(self) -> float | None:
        return self.bits_quantized / self.params_quantized if self.params_quantized else None


@dataclass
class DryRunReport:
    model: str
    recipe: dict
    source: str = ""  # "local folder", "Hub headers"...
    input_bytes: int = 0
    params_total: int = 0
    runs: list[RunPlan] = field(default_factory=list)
    calibration: dict | None = None
    peak_memory_bytes: int | None = None
    memory_terms: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    time_how: str = ""
    refusals: list[Refusal] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """What the real run would exit with: its first refusal's code, else 0."""
        return self.refusals[0].exit_code if self.refusals else 0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("runs", "refusals")}
        d["runs"] = [{**{k: v for k, v in r.__dict__.items() if k != "specs"}, "bpw_quantized": None if r.bpw is None else round(r.bpw, 4),
                      "refusal": r.refusal.__dict__ if r.refusal else None} for r in self.runs]
        d["refusals"] = [r.__dict__ for r in self.refusals]
        d["exit_code"] = self.exit_code
        d["dry_run"] = True
        return d


class _Refused(Exception):
    pass


class _Checks:
    """Runs one step of the run; a QtoolError becomes a Refusal in the report (and _Refused)."""

    def __init__(self, report: DryRunReport) -> None:
        self.report = report

    def __call__(self, stage: str, fn: Callable[[], object], fmt: str | None = None):
        try:
            return fn()
        except QtoolError as e:
            self.report.refusals.append(Refusal(stage, e.exit_code, str(e), fmt))
            raise _Refused from None

    def soft(self, stage: str, fn: Callable[[], object], fmt: str | None = None) -> bool:
        """A refusal that does not keep the rest of the plan from being worked out; False if refused."""
        try:
            self(stage, fn, fmt)
            return True
        except _Refused:
            return False


def dry_run(model: str, recipe: QuantRecipe, writers: list[FormatWriter], outs: list[Path], *, overwrite: bool = False,
            checks: list[tuple[str, Callable[[], object]]] = (), revision: str | None = None, token: str | None = None,
            allow_pickle: bool = False, trust_remote_code: bool = False) -> DryRunReport:
    """Plan the run of `writers` into `outs` (as `qtool quantize` would make them). `checks`: the
    CLI's own pre-run checks (push, resume) as (stage, callable), run first and collected."""
    report = DryRunReport(model, recipe.to_dict())
    attempt = _Checks(report)
    for stage, fn in checks:
        attempt.soft(stage, fn)
    try:
        source = attempt("open", lambda: _open(model, revision, token, allow_pickle))
    except _Refused:
        return report
    with source:
        try:
            _describe_source(report, source)
            attempt("model", lambda: _check_model(source, model, trust_remote_code))
        except _Refused:
            return report
        for w, o in zip(writers, outs):
            r = replace(recipe, format=w.registry_name) if len(writers) > 1 else recipe
            report.runs.append(_plan_run(source, r, w, o, overwrite, attempt))
        _estimate_resources(report, source, recipe, writers)
    report.not_checked = ["refusals that depend on weight values (NaN/Inf in a weight, a scale overflowing float16)"]
    if recipe.dataset:
        report.not_checked.append("whether the calibration data holds --samples x --seq-len tokens (known once tokenized)")
    return report


def _open(model: str, revision, token, allow_pickle) -> CheckpointSource:
    from qtool.model.resolve import is_hub_id, open_source

    if is_hub_id(model):
        from qtool.model.header_source import open_hub_headers

        return open_hub_headers(model, revision=revision, token=token, allow_pickle=allow_pickle)
    return open_source(model, revision=revision, token=token, allow_pickle=allow_pickle)


def _check_model(source: CheckpointSource, model: str, trust_remote_code: bool) -> None:
    from qtool.pipeline import check_model

    check_model(source, model, trust_remote_code)


def _describe_source(report: DryRunReport, source: CheckpointSource) -> None:
    from qtool.model.header_source import HubHeaderSource

    metas = source.tensors()
    report.params_total = sum(m.numel for m in metas)
    if isinstance(source, HubHeaderSource):
        report.source, report.input_bytes = f"Hub repository {source.repo_id} (headers only)", source.weight_bytes
    else:
        files = [f for f in source.input_files() if f.suffix in (".safetensors", ".gguf", ".bin", ".pt")]
        report.source, report.input_bytes = str(source.path), sum(f.stat().st_size for f in files)


def _plan_run(source: CheckpointSource, recipe: QuantRecipe, writer: FormatWriter, out: Path, overwrite: bool,
              attempt: _Checks) -> RunPlan:
    """One writer's run, step by step as pipeline.run takes them; the first refusal ends it."""
    from qtool.io import check_output_free
    from qtool.pipeline import LayerPlan, _summarize_kept, fused_expert_notes, open_stats, plan_layers

    plan_run = RunPlan(writer.registry_name, str(out))
    fmt = writer.registry_name
    if hasattr(writer, "estimate_only"):
        writer.estimate_only = True  # a --target's choice from probe errors: no weight is read
    try:
        if not attempt.soft("output", lambda: check_output_free(out, overwrite), fmt):  # the plan is still worth showing
            plan_run.refusal = attempt.report.refusals[-1]
        method = attempt("method", lambda: METHODS.get(recipe.method)(**recipe.method_params), fmt)
        if writer.self_quantizing and method.needs_calibration:
            plan = LayerPlan(attempt("plan", lambda: writer.calibration_specs(source, recipe), fmt), {})
        elif writer.self_quantizing:
            plan = LayerPlan({}, {})
        else:
            plan = attempt("plan", lambda: plan_layers(source, recipe, writer, proxy=True), fmt)
            plan_run.notes += _summarize_kept(plan.kept) + plan.run_notes + fused_expert_notes(source, writer)
        plan_run.notes += sorted({f"{sum(1 for v in plan.notes.values() if v == t)} layers: {t}" for t in plan.notes.values()})
        if method.needs_calibration and recipe.stats:
            attempt("stats", lambda: open_stats(recipe, source, plan), fmt)
        elif method.needs_calibration:
            attempt("calibration", lambda: _check_calibration(source, recipe), fmt)
        header, plan_run.setup_seconds = attempt("writer", lambda: _scratch_begin(writer, source, recipe), fmt)
        if note := getattr(writer, "imatrix_note", None):  # GGUF: the imatrix used, what a --target chose
            plan_run.notes.append(note)
        plan_run.specs = plan.specs  # for the resource estimates
        _sizes(plan_run, source, writer, plan, header)
    except _Refused:
        plan_run.refusal = plan_run.refusal or attempt.report.refusals[-1]
    return plan_run


def _check_calibration(source: CheckpointSource, recipe: QuantRecipe) -> None:
    """What load_calibration_for needs, short of tokenizing: the tokenizer loads, a local data file
    is readable; a recipe name or a Hub dataset is fetched at run time (not checked here)."""
    from qtool.calib import data
    from qtool.errors import FormatError
    from qtool.evaluate import load_tokenizer

    gguf_file = source.path.is_file() and source.path.suffix == ".gguf"
    where = source.path if gguf_file or source.path.is_dir() else source.path.parent
    try:
        load_tokenizer(where)
    except FormatError as e:
        raise UnsupportedError(f"calibration needs the model's tokenizer: {e}") from None
    spec = recipe.dataset or ""
    if Path(spec).expanduser().is_file() or data._looks_like_path(spec) or Path(spec).expanduser().is_dir():
        data.open_source(spec, dataset_config=recipe.dataset_config, split=recipe.split, text_field=recipe.text_field)


def _scratch_begin(writer: FormatWriter, source: CheckpointSource, recipe: QuantRecipe) -> tuple[int, float]:
    """The writer's begin() into a scratch path in the system temp folder, then abort; returns the
    bytes it wrote there (a GGUF file's header and metadata) and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="qtool-dry-run-") as d:
        path = Path(d) / "out"
        if writer.output_is_dir:
            path.mkdir()
        try:
            t0 = time.perf_counter()
            writer.begin(path, source, recipe)
            seconds = time.perf_counter() - t0
            writer.abort()
            return (path.stat().st_size if path.is_file() else 0), seconds
        except OSError as e:
            writer.abort()
            from qtool.errors import FormatError

            raise FormatError(f"{path}: the writer's setup failed: {e.strerror or e}") from None
        except BaseException:
            writer.abort()
            raise


def _sizes(plan_run: RunPlan, source: CheckpointSource, writer: FormatWriter, plan, header_bytes: int) -> None:
    metas = {m.name: m for m in source.tensors()}
    if writer.self_quantizing:
        from qtool.formats.gguf import mixtures as mx

        plan_run.format_type = writer.describe()
        total = header_bytes
        for e in writer.entries:
            total += -(-e.nbytes // 32) * 32
            if e.const is None and mx.allows_quantization(e.name, e.ne):
                numel = math.prod(e.shape)
                plan_run.layers.append({"name": e.name, "shape": list(e.shape), "type": e.qtype.name, "bits": e.nbytes * 8})
                plan_run.params_quantized += numel
                plan_run.bits_quantized += e.nbytes * 8
        plan_run.output_bytes = total
        return
    for name, spec in plan.specs.items():
        m = metas[name]
        bits = est.layer_bits(m.shape, spec, m.dtype)
        if spec.codebook is not None:  # as `qtool inspect` names AQLM layers
            how = f"aqlm {spec.codebook[0]}x{spec.codebook[1]} g{spec.group_size}"
        else:
            how = f"{spec.qtype.name} " + (f"g{spec.group_size}" if spec.strategy == "group" else spec.strategy)
        plan_run.layers.append({"name": name, "shape": list(m.shape), "type": how + ("" if spec.symmetric else " asym"), "bits": bits})
        plan_run.params_quantized += m.numel
        plan_run.bits_quantized += bits
    rest = sum(m.numel * m.dtype.itemsize for n, m in metas.items() if n not in plan.specs)
    aux = sum(f.stat().st_size for f in _aux_files(source))
    formats = [w.registry_name for w in getattr(writer, "writers", [writer])]
    for fmt in formats:
        layers = sum(est.format_layer_bytes(fmt, metas[n].shape, s, metas[n].dtype) for n, s in plan.specs.items())
        plan_run.sizes[fmt] = layers + rest + est.ST_ENTRY * (len(metas) + 3 * len(plan.specs)) + aux + est.SMALL_FILES
    plan_run.output_bytes = sum(plan_run.sizes.values())


def _aux_files(source: CheckpointSource) -> list[Path]:
    from qtool.model.safetensors_source import AUX_FILES

    folder = source.path if source.path.is_dir() else source.path.parent
    return [folder / n for n in AUX_FILES if (folder / n).is_file()] if source.path.suffix != ".gguf" else []


def _estimate_resources(report: DryRunReport, source: CheckpointSource, recipe: QuantRecipe, writers) -> None:
    from qtool.dryrun_resources import estimate_resources

    estimate_resources(report, source, recipe, writers)
