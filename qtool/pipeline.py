"""The engine: resolve → plan (cheap, before any weight is read) → stream tensors block by block
through the method into the writer → provenance → atomic rename. Emits progress events; never
prints. Peak memory stays near one tensor (RTN) — one block once calibration methods arrive."""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qtool import __version__
from qtool.config import QuantRecipe
from qtool.core.metrics import sqnr_db
from qtool.engine.distributed import current as current_comm
from qtool.errors import FormatError, Interrupted, NumericalError, UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.formats.base import FormatWriter
from qtool.io import atomic_output, check_output_free, sha256_file
from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.model.source import CheckpointSource, TensorMeta
from qtool.model.structure import ROUTER_GLOBS, check_tensors, family_of
from qtool.qtypes import get_qtype

# MoE routers stay in full precision unless targeted explicitly (as every MoE recipe does).
DEFAULT_IGNORE = ROUTER_GLOBS


@dataclass(frozen=True)
class Event:
    """Progress: `stage` names the step, `done`/`total` count its units, `item` is the current one."""

    stage: str
    done: int
    total: int
    item: str = ""


EventSink = Callable[[Event], None]


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    strategy: str
    group_size: int | None
    sqnr_db: float
    note: str | None = None
    gptq: dict | None = None  # calibration methods: damping used, retries, dead inputs, shared Hessian


@dataclass
class RunReport:
    model: str
    output: str
    format: str
    recipe: dict | None
    format_type: str | None = None  # what the format itself chose, e.g. GGUF "Q4_K_M"
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    params_quantized: int = 0
    params_total: int = 0
    weight_bits: float = 0.0  # storage bits of the quantized layers (codes + scales + zeros)
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict | None = None  # provenance of the calibration windows (calibration methods)
    eval: dict | None = None  # `--eval`: qtool eval's figures for the output against the input model
    published: dict | None = None  # `--push-to-hub`: repo, url, commit, files uploaded
    distributed: dict | None = None  # several processes: world size, backend, bytes all-reduced (rank 0's share)
    notes_extra: list[str] = field(default_factory=list, repr=False)  # run-level notes, ahead of per-layer ones

    @property
    def bpw_quantized(self) -> float:
        """Effective bits per weight over the quantized layers, scales and zero points included."""
        return self.weight_bits / self.params_quantized if self.params_quantized else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("layers", "notes_extra")}
        d["bpw_quantized"] = round(self.bpw_quantized, 4)
        finite = [r.sqnr_db for r in self.layers if math.isfinite(r.sqnr_db)]
        d["sqnr_db_mean"] = round(sum(finite) / len(finite), 3) if finite else None
        d["sqnr_db_min"] = round(min(finite), 3) if finite else None
        d["layers"] = [
            {**r.__dict__, "sqnr_db": round(r.sqnr_db, 3) if math.isfinite(r.sqnr_db) else None, "shape": list(r.shape)}
            for r in self.layers
        ]
        return d


def check_architecture(config: dict, where: str, trust_remote_code: bool = False) -> None:
    """From config.json alone: an architecture transformers implements as a causal LM (or an
    image-text-to-text model), else a one-line refusal (qtool/model/structure.py)."""
    family_of(config, where, trust_remote_code=trust_remote_code)


def check_model(source: CheckpointSource, where: str, trust_remote_code: bool = False) -> None:
    """Before any weight is read: the architecture (from the config), its decoder-block structure
    (the model built on the meta device) and, for safetensors checkpoints, every tensor's name and
    shape against what that architecture loads."""
    from qtool.model.safetensors_source import SafetensorsSource

    check_architecture(source.config, where, trust_remote_code)
    source.trust_remote_code = trust_remote_code
    structure = source.structure
    if isinstance(source, SafetensorsSource):
        check_tensors(structure, {t.name: t.shape for t in source.tensors()}, where)


def module_of(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def select_layers(metas: list[TensorMeta], recipe: QuantRecipe, structure=None) -> list[TensorMeta]:
    """Which weights get quantized: by default every linear of the decoder blocks as transformers
    builds them (`structure`: qtool/model/structure.py; MoE experts included, routers not);
    `--target` globs replace that set (and may reach lm_head, embeddings, a vision tower);
    `--ignore` globs are removed from it."""

    def hit(name: str, globs) -> bool:
        return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, f"*.{g}") for g in globs)

    cands = [m for m in metas if m.name.endswith(".weight") and len(m.shape) == 2]
    if recipe.targets:
        chosen = [m for m in cands if hit(module_of(m.name), recipe.targets)]
        if not chosen:
            raise UsageError(f"--target {' '.join(recipe.targets)}: matches no 2-D weight of this model")
    elif structure is not None:
        linears = set(structure.linears())
        chosen = [m for m in cands if m.name in linears and not hit(module_of(m.name), DEFAULT_IGNORE)]
    else:
        from qtool.model.source import block_of

        chosen = [m for m in cands if block_of(m.name) and not hit(module_of(m.name), DEFAULT_IGNORE)]
    return [m for m in chosen if not hit(module_of(m.name), recipe.ignore)]


@dataclass
class LayerPlan:
    specs: dict[str, LayerSpec]  # tensor name -> spec
    notes: dict[str, str]  # tensor name -> what the format changed, for the summary
    run_notes: list[str] = field(default_factory=list)  # what the format left out, for the summary
    kept: dict[str, str] = field(default_factory=dict)  # tensor name -> why the format keeps it unquantized


def plan_layers(source: CheckpointSource, recipe: QuantRecipe, writer: FormatWriter, *, proxy: bool = False) -> LayerPlan:
    """Per-layer specs from shapes alone: every impossible request fails here, before any weight is
    read. With --target-bpw/--target-size the widths are then chosen per layer (qtool/target_layers.py:
    one read of the weights for their errors; `proxy`, a dry run: no read, probe errors)."""
    qtype = get_qtype(recipe.qtype)
    chosen = select_layers(source.tensors(), recipe, source.structure)
    plan = LayerPlan({}, {})
    experts = source.structure.expert_names()
    if not recipe.targets and not writer.holds_experts and any(m.name in experts for m in chosen):
        # the consumer fuses MoE experts on load into tensors it cannot hold quantized: quantize
        # what it loads as Linear layers, keep the experts in full precision, and say so
        left = [m.name for m in chosen if m.name in experts]
        chosen = [m for m in chosen if m.name not in experts]
        plan.run_notes.append(f"{len(left)} MoE expert linears kept in full precision (e.g. {left[0]}): "
                              f"--format {writer.registry_name} loaders fuse experts on load and cannot hold them quantized")
    linears = [module_of(m.name) for m in source.tensors() if m.name.endswith(".weight") and len(m.shape) == 2]
    writer.structure = source.structure
    writer.check_plan({module_of(m.name) for m in chosen}, linears, recipe)
    choices = writer.choose_layouts({module_of(m.name): tuple(m.shape) for m in chosen}, recipe)
    extra = writer.spec_options(recipe)
    for m in chosen:
        choice = choices[module_of(m.name)]
        if choice.strategy == "keep":  # the format cannot hold this layer quantized: full precision, said why
            plan.kept[m.name] = choice.note or "kept in full precision by the format"
            continue
        plan.specs[m.name] = LayerSpec(m.name, qtype, choice.strategy, choice.group_size, recipe.symmetric, **extra)
        if choice.note:
            plan.notes[m.name] = choice.note
    from qtool.target import target_of

    if (target := target_of(recipe)) is not None and plan.specs:
        from qtool.target_layers import allocate_bits, check_format

        plan.specs, note = allocate_bits(source, recipe, check_format(writer), plan.specs, target, proxy=proxy)
        plan.run_notes.append(note)
    return plan


def fused_expert_notes(source: CheckpointSource, writer: FormatWriter) -> list[str]:
    """MoE experts the checkpoint itself stores fused (3-D, e.g. gpt-oss) are no Linear that a loader
    of these formats quantizes: they stay in full precision, and the summary says so."""
    fused = source.structure.fused_experts()
    if not fused:
        return []
    return [f"{len(fused)} MoE expert tensors kept in full precision (e.g. {fused[0]}): the checkpoint stores them "
            f"fused (3-D), and --format {writer.registry_name} loaders quantize Linear layers only"]


def check_finite(name: str, w: torch.Tensor, where: str = "") -> None:
    # min/max propagate NaN and keep Inf: one fused reduction instead of an elementwise isfinite pass
    if w.is_floating_point() and w.numel() and not torch.isfinite(torch.stack(torch.aminmax(w))).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise NumericalError(f"{where + ': ' if where else ''}tensor {name}: {bad} NaN/Inf value(s); the checkpoint is damaged")


def ordered_tensors(source: CheckpointSource) -> list[TensorMeta]:
    """Block by block (so one block's tensors are read together), then everything else."""
    metas = source.tensors()
    order = {b: i for i, b in enumerate(source.blocks())}
    return sorted(metas, key=lambda m: order.get(source.block_of(m.name) or "", len(order)))


def input_record(source: CheckpointSource, hash_inputs: bool = True) -> dict:
    """The input files as provenance names them: file name -> bytes (and sha256)."""
    return {f.name: {"bytes": f.stat().st_size, **({"sha256": sha256_file(f)} if hash_inputs else {})}
            for f in source.input_files()}


def provenance(source: CheckpointSource, model: str, recipe: QuantRecipe | None, hash_inputs: bool,
               inputs: dict | None = None) -> dict:
    """`inputs`: input_record() when the caller already has it (hashing a large model twice costs minutes)."""
    import transformers

    inputs = inputs if inputs is not None else input_record(source, hash_inputs)
    return {
        "model": model,
        "recipe": recipe.to_dict() if recipe else None,
        "inputs": inputs,
        "versions": {"qtool": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _stream(
    source: CheckpointSource,
    writer: FormatWriter,
    plan: LayerPlan,
    report: RunReport,
    on_event: EventSink,
    method,
    stats=None,
) -> None:
    """Tensor by tensor, in block order. `stats` (a CalibStats) gives calibration methods their
    per-layer Hessians from a `qtool calibrate` file instead of a calibration run."""
    metas = ordered_tensors(source)
    device = torch.device(report.recipe["device"]) if report.recipe else torch.device("cpu")
    current_block = None
    for i, m in enumerate(metas):
        on_event(Event("quantize" if plan.specs else "convert", i, len(metas), m.name))
        if source.block_of(m.name) != current_block:
            source.release()
            current_block = source.block_of(m.name)
        t = source.get_tensor(m.name)
        report.params_total += m.numel
        spec = plan.specs.get(m.name)
        if spec is None:
            if writer.self_quantizing:
                check_finite(m.name, t, str(source.path))
            _add_tensor(m.name, t, report, writer)
            continue
        w = t.to(device)
        layer_stats = None
        if stats is not None:
            qw, st = method.quantize_with_stats(w, spec, stats.hessian(module_of(m.name)).to(device))
            layer_stats = _layer_stats(st, stats.modules[module_of(m.name)].owner + ".weight", m.name)
        else:
            qw = method.quantize(w, spec)  # scales come back in the checkpoint dtype
        _write_quantized(m.name, w, qw, spec, plan, report, writer, str(source.path), layer_stats)
        del t, w, qw
    on_event(Event("quantize" if plan.specs else "convert", len(metas), len(metas)))


def _write_quantized(
    name: str,
    w: torch.Tensor,
    qw,
    spec: LayerSpec,
    plan: LayerPlan,
    report: RunReport,
    writer: FormatWriter,
    where: str,
    stats: dict | None = None,
) -> None:
    """One quantized layer: finiteness check, error, report entry, then the writer."""
    if not torch.isfinite(qw.scale.float()).all():  # NaN/Inf in a weight reach its scales: a free check
        check_finite(name, w, where)
    err = sqnr_db(w, qw.dequantize(torch.float32))
    note = plan.notes.get(name)
    if qw.float_zeros and not writer.float_zero_points:  # HQQ's float zeros into an integer-zero format
        qw = qw.with_integer_zeros(w)
        rounded = sqnr_db(w, qw.dequantize(torch.float32))
        note = "; ".join(filter(None, [note, f"float zero points rounded to integers: SQNR {err:.1f} -> {rounded:.1f} dB"]))
        err = rounded
    outcome = writer.add_quantized(name, qw)  # writers move to CPU as they serialise
    strategy, group, bits = spec.strategy, spec.group_size, qw.storage_bits()
    if getattr(qw, "scheme", None):  # codebook weights (AQLM): "codebook 2x8", group = input columns per code
        strategy, group = f"codebook {qw.scheme}", qw.group_size
    if outcome is not None:  # a self-quantizing writer (GGUF) says which type holds it and what that changed
        strategy, group, note, bits = outcome.qtype, None, outcome.note, outcome.storage_bits
    report.layers.append(LayerResult(name, tuple(w.shape), strategy, group, err, note, stats))
    report.params_quantized += w.numel()
    report.weight_bits += bits


def load_calibration_for(source: CheckpointSource, recipe: QuantRecipe):
    """The recipe's calibration windows, tokenized with the model's own tokenizer."""
    from qtool.calib.data import load_calibration
    from qtool.evaluate import load_tokenizer

    gguf_file = source.path.is_file() and source.path.suffix == ".gguf"
    where = source.path if gguf_file or source.path.is_dir() else source.path.parent
    try:
        tokenizer = load_tokenizer(where)  # a GGUF carries its own tokenizer
    except FormatError as e:
        raise UnsupportedError(f"calibration needs the model's tokenizer: {e}") from None
    return load_calibration(recipe.dataset, tokenizer, samples=recipe.samples, seq_len=recipe.seq_len, seed=recipe.seed,
                            dataset_config=recipe.dataset_config, split=recipe.split, text_field=recipe.text_field)


def check_block_linears_only(plan: LayerPlan, method: str, source: CheckpointSource) -> None:
    """Calibration statistics exist for decoder-block linears only (a run's or a stats file's)."""
    outside = [n for n in plan.specs if source.block_of(n) is None]
    if outside:
        raise UnsupportedError(f"{outside[0]}: --method {method} quantizes decoder-block linears only")


def _calibrated(
    source: CheckpointSource,
    writer: FormatWriter,
    plan: LayerPlan,
    report: RunReport,
    on_event: EventSink,
    method,
    input_ids: torch.Tensor | None,
    stats=None,
    checkpoint=None,
) -> None:
    """Calibration methods: non-block tensors pass through; blocks go through the block-level
    engine (engine/block_engine.py), which hands back replaced float tensors (AWQ's rescaled norms)
    in place of the checkpoint's. `stats` (--stats, for methods that can use it): statistics from a
    file instead of calibration windows. `checkpoint`: the run's resume checkpoint (engine/checkpoint.py)."""
    from qtool.engine.block_engine import BlockNote, run_block_method
    from qtool.engine.blockwise import PassThrough

    check_block_linears_only(plan, report.recipe["method"], source)
    for m in source.tensors():
        if source.block_of(m.name) is None:
            report.params_total += m.numel
            _add_tensor(m.name, source.get_tensor(m.name), report, writer)
    source.release()
    progress = lambda stage, done, total, item: on_event(Event(stage, done, total, item))  # noqa: E731
    items = run_block_method(source, plan.specs, method, input_ids, device=report.recipe.get("device", "cpu"), stats=stats,
                             progress=progress, checkpoint=checkpoint)
    block_notes: dict[str, int] = {}  # the same remark from many blocks is said once, with a count
    for item in items:
        if isinstance(item, BlockNote):
            block_notes[item.text] = block_notes.get(item.text, 0) + 1
            continue
        report.params_total += item.tensor.numel() if isinstance(item, PassThrough) else item.weight.numel()
        if isinstance(item, PassThrough):
            _add_tensor(item.name, item.tensor, report, writer)
            continue
        stats_d = _layer_stats(item.stats, item.shares_hessian_with, None)
        _write_quantized(item.name, item.weight, item.qw, plan.specs[item.name], plan, report, writer, str(source.path), stats_d)
    report.notes_extra += [f"{text} ({n} block{'s' if n > 1 else ''})" for text, n in block_notes.items()]


def _add_tensor(name: str, t: torch.Tensor, report: RunReport, writer: FormatWriter) -> None:
    """A tensor the method left alone; a self-quantizing writer may quantize it (reported then)."""
    outcome = writer.add_tensor(name, t)
    if outcome is not None:
        report.layers.append(LayerResult(name, tuple(t.shape), outcome.qtype, None, outcome.sqnr_db, outcome.note))
        report.params_quantized += t.numel()
        report.weight_bits += outcome.storage_bits


def _layer_stats(st, owner: str | None, me: str | None) -> dict:
    """A calibration method's per-layer figures for the report; `owner` names the layer whose
    Hessian this one shares (None, or equal to `me`, when its own)."""
    d = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (st if isinstance(st, dict) else st.__dict__).items()}
    d["shares_hessian_with"] = None if owner == me else owner
    return d


def open_stats(recipe: QuantRecipe, source: CheckpointSource, plan: LayerPlan):
    """`--stats FILE`, checked against the layers this run quantizes."""
    from qtool.calib.stats import CalibStats

    stats = CalibStats(Path(recipe.stats))
    needs = getattr(METHODS.get(recipe.method), "uses_stats", ())
    if "xtx" in needs and not stats.has_hessians:
        raise UsageError(f"--stats {recipe.stats}: saved without Hessians (Σ XᵀX; `qtool calibrate --no-hessian`); "
                         f"--method {recipe.method} needs it; re-run `qtool calibrate` without --no-hessian")
    check_block_linears_only(plan, recipe.method, source)
    shapes = {m.name: m.shape for m in source.tensors()}
    stats.check_model(source.config, {n: shapes[n] for n in plan.specs})
    return stats


def run(
    model: str,
    source: CheckpointSource,
    out: Path,
    writer: FormatWriter,
    recipe: QuantRecipe | None,
    *,
    overwrite: bool = False,
    hash_inputs: bool = True,
    evaluation: EvalRequest | None = None,
    on_event: EventSink = lambda e: None,
    method: object | None = None,
    resume: bool = False,
) -> RunReport:
    """Quantize (recipe given) or convert (recipe None) `source` into `out` with `writer`. With
    `evaluation`, the finished output is scored against the input before it is renamed into place;
    folder outputs get a model card (README.md) with the recipe and those figures. `method`, if
    given, replaces the recipe's (qtool/convert.py: a repack hands over the stored codes).
    Block-level calibration runs checkpoint every block beside the output (engine/checkpoint.py);
    `resume` continues from that checkpoint, refusing a missing or mismatched one."""
    from qtool.engine.checkpoint import check_resumable

    t0 = time.perf_counter()
    check_output_free(out, overwrite)
    if resume:
        check_resumable(out)
    if method is None:
        method = METHODS.get(recipe.method)(**recipe.method_params) if recipe else None
    calibrating = method is not None and method.needs_calibration
    blockwise = calibrating and not (recipe.stats and hasattr(method, "quantize_with_stats"))  # through the block engine
    if resume and not blockwise:
        raise UsageError(f"--resume: {'--method ' + recipe.method if recipe else 'a conversion'} runs no calibration "
                         "blocks here, so there is nothing to resume")
    if recipe and writer.self_quantizing and method.needs_calibration:  # GGUF: each tensor's type decides its grid
        plan = LayerPlan(writer.calibration_specs(source, recipe), {})
    else:
        plan = plan_layers(source, recipe, writer) if recipe and not writer.self_quantizing else LayerPlan({}, {})
    report = RunReport(model, str(out), writer.registry_name, recipe.to_dict() if recipe else None, writer.describe())
    report.notes_extra = _summarize_kept(plan.kept)
    if recipe is not None and not writer.self_quantizing:
        report.notes_extra.extend(plan.run_notes + fused_expert_notes(source, writer))
    calib = stats = None
    if method is not None and method.needs_calibration and recipe.stats:
        stats = open_stats(recipe, source, plan)
        report.calibration = {**stats.calibration, "stats_file": str(recipe.stats), "sequential": False}
        what = "Hessians" if hasattr(method, "quantize_with_stats") else "activation statistics"
        report.notes_extra += [f"{what} from {recipe.stats}: activations of the unquantized model (not sequential)"]
    elif method is not None and method.needs_calibration:
        on_event(Event("calibrate", 0, 1, recipe.dataset or ""))
        calib = load_calibration_for(source, recipe)
        report.calibration = {"spec": calib.spec, "tokens": calib.tokens_used, **calib.source}
    report.input_bytes = sum(f.stat().st_size for f in source.input_files() if f.suffix in (".safetensors", ".gguf", ".bin", ".pt"))
    inputs = input_record(source) if blockwise else None  # the checkpoint's fingerprint and the provenance share it
    comm, input_ids = current_comm(), calib.input_ids if calib else None
    if comm.active:  # several processes (engine/dist_pipeline.py): the same run on every rank, checked before any work
        from qtool.engine import dist_pipeline as dp

        if calib is not None:
            dp.check_windows(comm, input_ids.shape[0])
        elif blockwise:
            raise UsageError(f"--stats with --method {recipe.method}: the statistics come from the file, the blocks see one probe "
                             "sample; nothing to share across processes: run it with one process")
        comm.agree(dp.run_record(source, recipe, writer, plan, report.calibration, input_ids, inputs), "run (inputs, recipe, data)")
        input_ids = dp.shard_ids(comm, input_ids)
    checkpoint = None
    if blockwise:
        make = lambda: _checkpoint_for(out, source, recipe, writer, plan, report, calib, inputs, resume)  # noqa: E731
        checkpoint = make() if not comm.active else dp.DistCheckpoint(comm, make, _checkpoint_dir(out), calib.samples if calib else 1)
    if comm.active and not comm.is_writer:  # rank 0 alone writes; the others compute their share and wait for it
        dp.follow(comm, source, writer, recipe, plan, report, on_event, method, input_ids, stats if calib is None else None,
                  checkpoint, blockwise)
        comm.barrier(what="the end of the run")
        report.seconds = time.perf_counter() - t0
        return report
    with atomic_output(out, overwrite=overwrite, is_dir=writer.output_is_dir) as tmp:
        writer.begin(tmp, source, recipe)
        try:
            if blockwise:
                _calibrated(source, writer, plan, report, on_event, method, input_ids, stats if calib is None else None, checkpoint)
            elif comm.active:
                dp.dist_stream(comm, source, writer, plan, report, on_event, method, stats)
            else:
                _stream(source, writer, plan, report, on_event, method, stats)
            report.notes = report.notes_extra + _summarize_notes(report.layers)
            on_event(Event("write", 0, 1, str(out)))
            prov = provenance(source, model, recipe, hash_inputs, inputs if hash_inputs else None)
            if report.calibration is not None:
                prov["calibration"] = report.calibration
            writer.finish(source.config, {**prov, "report": _brief(report)})
            if evaluation is not None:
                on_event(Event("evaluate", 0, 1, str(out)))
                report.eval = {**evaluate_output(tmp, source, evaluation, on_event), "model": str(out)}
            if writer.output_is_dir and recipe is not None:
                _write_cards(tmp, out, writer, report, model)
        except OSError as e:  # disk full, quota, a vanished folder: the user's problem to fix, said in one line
            writer.abort()
            raise FormatError(f"{out}: cannot write: {e.strerror or e}") from None
        except KeyboardInterrupt:
            writer.abort()
            if checkpoint is None or not checkpoint.saved:
                raise
            raise Interrupted(f"interrupted; nothing was written to {out}; {checkpoint.saved} block(s) are checkpointed in "
                              f"{checkpoint.folder}: rerun with --resume to continue") from None
        except BaseException:
            writer.abort()
            raise
    if checkpoint is not None:
        checkpoint.discard()
    comm.barrier(what="the end of the run")
    report.distributed = comm.summary() if comm.active else None
    report.output_bytes = _size(out)
    report.seconds = time.perf_counter() - t0
    return report


def _checkpoint_dir(out: Path) -> Path:
    from qtool.engine.checkpoint import checkpoint_dir

    return checkpoint_dir(out)


def _checkpoint_for(out: Path, source: CheckpointSource, recipe: QuantRecipe, writer: FormatWriter, plan: LayerPlan,
                    report: RunReport, calib, inputs: dict, resume: bool):
    """The block engine's resume checkpoint for this output, fingerprinted by the input files'
    hashes, the recipe, the format and its per-layer specs, the calibration windows and the versions."""
    from qtool.engine.checkpoint import BlockCheckpoint, checkpoint_dir, fingerprint

    fp = fingerprint(inputs=inputs, recipe=recipe.to_dict(), fmt=writer.registry_name,
                     specs={n: repr(s) for n, s in plan.specs.items()}, calibration=report.calibration or {},
                     input_ids=calib.input_ids if calib is not None else None)
    return BlockCheckpoint(checkpoint_dir(out), fp, resume=resume)


def _write_cards(tmp: Path, out: Path, writer: FormatWriter, report: RunReport, model: str) -> None:
    """The model card (README.md) of each output folder: the one output, or each format's folder
    of a multi-format run (formats/multi.py)."""
    from qtool.card import model_card

    report.output_bytes = _size(tmp)
    parts = writer.parts(tmp) if hasattr(writer, "parts") else [(tmp, writer.registry_name)]
    for folder, fmt in parts:
        if folder.is_dir():
            where = out / folder.relative_to(tmp)
            card = model_card(report.to_dict() | {"output": str(where), "format": fmt, "output_bytes": _size(folder)}, model)
            (folder / "README.md").write_text(card, encoding="utf-8")


def validate_formats(recipe: QuantRecipe, spec: str, **options: object) -> list[FormatWriter]:
    """`-f a,b,...`: the writers, each validated as `validate_early` does, grouped into runs: one
    run (a MultiWriter when several) for the formats that take the method's QuantizedWeights, one
    more for each self-quantizing format (GGUF picks its own per-tensor grids)."""
    from dataclasses import replace

    from qtool.formats.multi import MultiWriter, check_options_used, options_for, parse_formats

    names = parse_formats(spec)
    if len(names) == 1:
        return [validate_early(recipe, names[0], **options)]
    check_options_used(names, options)
    copies = [replace(recipe, format=n) for n in names]
    writers = [validate_early(c, n, **options_for(n, options)) for c, n in zip(copies, names)]
    recipe.symmetric = all(c.symmetric for c in copies)  # validate_early may make it asymmetric (HQQ)
    shared = [w for w in writers if not w.self_quantizing]
    return ([MultiWriter(shared)] if len(shared) > 1 else shared) + [w for w in writers if w.self_quantizing]


@dataclass(frozen=True)
class EvalRequest:
    """`quantize --eval`: score the output against the input model on held-out text."""

    dataset: Path  # a UTF-8 text file
    part: str = "eval"  # its second half: the half calibration never reads (qtool.evaluate.split_text)
    windows: int | None = 32
    seq_len: int = 512
    backend: str = "auto"

    def check(self) -> None:
        if not self.dataset.is_file():
            raise UsageError(f"--eval-dataset {self.dataset}: no such file (a UTF-8 text file of held-out text)")
        if self.dataset.suffix not in (".txt", ".md", ".text", ""):
            raise UsageError(f"--eval-dataset {self.dataset}: expected a plain text file (.txt)")


def evaluate_output(path: Path, source: CheckpointSource, req: EvalRequest, on_event: EventSink) -> dict:
    from qtool.evaluate import evaluate_checkpoint

    rep = evaluate_checkpoint(path, req.dataset, base=source.path, part=req.part, seq_len=req.seq_len,
                              max_windows=req.windows, backend=req.backend,
                              on_batch=lambda done, total: on_event(Event("evaluate", done, total, "")))
    return rep.to_dict()


def _summarize_notes(layers: list[LayerResult]) -> list[str]:
    counts: dict[str, int] = {}
    for layer in layers:
        if layer.note:
            counts[layer.note] = counts.get(layer.note, 0) + 1
    return [f"{n} layers: {note}" for note, n in counts.items()]


def _summarize_kept(kept: dict[str, str]) -> list[str]:
    by_note: dict[str, list[str]] = {}
    for name, note in kept.items():
        by_note.setdefault(note, []).append(module_of(name))
    return [f"{len(ms)} layers kept in full precision ({', '.join(ms[:3])}{', ...' if len(ms) > 3 else ''}): {note}"
            for note, ms in by_note.items()]


def _brief(report: RunReport) -> dict:
    d = report.to_dict()
    return {k: d[k] for k in ("params_quantized", "params_total", "bpw_quantized", "sqnr_db_mean", "sqnr_db_min", "notes")}


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def validate_early(recipe: QuantRecipe | None, fmt: str, **writer_options: object) -> FormatWriter:
    """Everything judgeable from flags: unknown method/format names, format/type combinations,
    format options (`--type`)."""
    writer_cls = FORMATS.get(fmt)
    writer = writer_cls(**writer_options)
    if recipe is not None:
        method = METHODS.get(recipe.method)
        if recipe.weight_type.kind not in method.supported_kinds and not writer.self_quantizing:
            raise UnsupportedError(f"--method {recipe.method} cannot produce {recipe.qtype} weights")
        check_calibration_flags(recipe, method)
        only = getattr(method, "formats", None)  # methods whose weights only some formats hold (AQLM's codebooks)
        if only and fmt not in only:
            raise UnsupportedError(f"--method {recipe.method} produces weights only --format {', '.join(only)} holds, "
                                   f"not --format {fmt}")
        if method.always_asymmetric:
            recipe.symmetric = False  # HQQ optimizes zero points: its grid is asymmetric by construction
        if method.needs_calibration and writer.self_quantizing and not hasattr(writer, "calibration_specs"):
            raise UnsupportedError(f"--method {recipe.method}: --format {fmt} quantizes with its own block types; use -m rtn")
        writer.check_recipe(recipe)
        if (recipe.target_bpw is not None or recipe.target_size is not None) and not writer.self_quantizing:
            from qtool.target_layers import check_format

            check_format(writer)
    return writer


def check_calibration_flags(recipe: QuantRecipe, method_cls) -> None:
    """Calibration flags against the method (exit 2), from the registry's `needs_calibration`."""
    params = recipe.method_params
    targeted = recipe.target_bpw is not None or recipe.target_size is not None
    if recipe.stats and not method_cls.needs_calibration and not targeted:
        raise UsageError(f"--stats: --method {recipe.method} uses no calibration statistics (with --target-bpw/--target-size "
                         "they weight the choice of widths)")
    if recipe.stats and recipe.dataset:
        raise UsageError("--stats and --dataset: give one (--stats reuses the statistics of a `qtool calibrate` run)")
    if method_cls.needs_calibration:
        if recipe.stats:
            if hasattr(method_cls, "uses_stats") and not method_cls.uses_stats:
                raise UsageError(f"--stats: --method {recipe.method} needs calibration data run through the model (give --dataset)")
            method_cls(**params)
            return
        if not recipe.dataset:
            raise UsageError(f"--method {recipe.method} needs calibration data: give --dataset FILE|RECIPE|HUB_ID (e.g. wikitext2) "
                             "or --stats FILE from `qtool calibrate`")
        if recipe.samples < 1 or recipe.seq_len < 2:
            raise UsageError(f"--samples {recipe.samples} / --seq-len {recipe.seq_len}: need >= 1 sample of >= 2 tokens")
        inst = method_cls(**params)  # validates the method's own options
        if hasattr(inst, "check_samples"):  # options bounded by --samples (autoround's --batch-size)
            inst.check_samples(recipe.samples)
        return
    if recipe.dataset:
        raise UsageError(f"--dataset: --method {recipe.method} uses no calibration data")
    if params:
        flags = ", ".join("--" + k.replace("_", "-") for k in params)
        raise UsageError(f"{flags}: not an option of --method {recipe.method}")


# -- qtool calibrate ---------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    model: str
    output: str
    seconds: float = 0.0
    output_bytes: int = 0
    modules: int = 0  # linears with statistics
    distinct_inputs: int = 0  # statistics sets stored (linears fed the same input share one)
    tokens: int = 0
    hessians: bool = True
    calibration: dict | None = None
    imatrix: str | None = None  # llama.cpp importance-matrix file written beside the stats, if asked
    distributed: dict | None = None  # several processes: world size, backend, bytes all-reduced (rank 0's share)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate(
    model: str,
    source: CheckpointSource,
    out: Path,
    recipe: QuantRecipe,
    *,
    hessians: bool = True,
    imatrix_out: Path | None = None,
    overwrite: bool = False,
    on_event: EventSink = lambda e: None,
) -> CalibrationReport:
    """Run the recipe's calibration windows through the unquantized model, block by block, and
    save every decoder-block Linear's input statistics (qtool/calib/stats.py) to `out`."""
    from qtool.calib.stats import block_tensors, header_metadata
    from qtool.engine.blockwise import collect_stats
    from qtool.formats.st_stream import StreamingSafetensorsWriter

    t0 = time.perf_counter()
    check_output_free(out, overwrite)
    if imatrix_out is not None:
        check_output_free(imatrix_out, overwrite)
    wanted = {m.name for m in select_layers(source.tensors(), recipe, source.structure)}
    if not wanted:
        raise UsageError(f"{model}: no decoder-block linear to collect statistics for")
    on_event(Event("calibrate", 0, 1, recipe.dataset or ""))
    calib = load_calibration_for(source, recipe)
    report = CalibrationReport(model, str(out), hessians=hessians, tokens=calib.tokens_used,
                               calibration={"spec": calib.spec, "tokens": calib.tokens_used, **calib.source})
    modules: dict[str, dict] = {}
    importance: dict[str, tuple[torch.Tensor, int]] = {}
    progress = lambda stage, done, total, item: on_event(Event(stage, done, total, item))  # noqa: E731
    comm, input_ids = current_comm(), calib.input_ids
    if comm.active:  # several processes: windows sharded, statistics all-reduced per block, rank 0 writes
        from qtool.engine import dist_pipeline as dp

        dp.check_windows(comm, input_ids.shape[0])
        comm.agree(dp.calibrate_record(source, recipe, wanted, hessians, report.calibration, input_ids, imatrix_out), "run (inputs, recipe, data)")
        input_ids = dp.shard_ids(comm, input_ids)
        if not comm.is_writer:
            for _ in collect_stats(source, wanted, input_ids, hessians=hessians, progress=progress):
                pass
            comm.barrier(what="the end of the run")
            report.seconds = time.perf_counter() - t0
            return report
    with atomic_output(out, overwrite=overwrite, is_dir=False) as tmp:
        writer = StreamingSafetensorsWriter(tmp)
        try:
            for bs in collect_stats(source, wanted, input_ids, hessians=hessians, progress=progress):
                entries, tensors = block_tensors(bs)
                modules.update(entries)
                for k, t in tensors.items():
                    writer.add(k, t)
                for m, e in entries.items():
                    importance[m] = (tensors[f"{e['owner']}.sum_x2"], int(tensors[f"{e['owner']}.tokens"][0]))
            writer.metadata = header_metadata(source.config, modules, report.calibration, hessians)
            on_event(Event("write", 0, 1, str(out)))
            writer.close()
        except OSError as e:
            writer.abort()
            raise FormatError(f"{out}: cannot write: {e.strerror or e}") from None
        except BaseException:
            writer.abort()
            raise
    if imatrix_out is not None:  # after the stats file is in place: each output is complete or absent
        from qtool.formats.gguf.imatrix import write_imatrix

        write_imatrix(imatrix_out, importance, config=source.config, datasets=[calib.spec], chunks=calib.samples,
                      chunk_size=calib.seq_len, overwrite=overwrite)
        report.imatrix = str(imatrix_out)
    comm.barrier(what="the end of the run")
    report.distributed = comm.summary() if comm.active else None
    report.modules = len(modules)
    report.distinct_inputs = len({e["owner"] for e in modules.values()})
    report.output_bytes = _size(out)
    report.seconds = time.perf_counter() - t0
    return report
