"""`qtool calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qtool.cli import options as opt
from qtool.cli._app import ProgressDisplay, handle_errors, human_bytes, out, print_json
from qtool.config import QuantRecipe
from qtool.model.resolve import open_source
from qtool.pipeline import CalibrationReport, calibrate as run_calibration, check_model
from qtool.errors import UsageError


@handle_errors
def calibrate(
    model: Annotated[str, typer.Argument(help="Local folder, .safetensors file, or Hub id (org/name).")],
    dataset: opt.Dataset = None,
    dataset_config: opt.DatasetConfig = None,
    split: opt.Split = None,
    text_field: opt.TextField = None,
    samples: opt.Samples = 128,
    seq_len: opt.SeqLen = 512,
    seed: opt.Seed = 0,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Statistics file to write (.safetensors).")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Also write the importance matrix as a llama.cpp imatrix file (.gguf, or .dat for the legacy format).")] = None,
    no_hessian: Annotated[bool, typer.Option("--no-hessian", help="Save only per-channel statistics (importance matrix, activation magnitudes), not the [in x in] Hessians GPTQ needs.")] = False,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip modules matching this glob (repeatable).")] = None,
    revision: opt.Revision = None,
    token: opt.Token = None,
    allow_pickle: opt.AllowPickle = False,
    trust_remote_code: opt.TrustRemoteCode = False,
    overwrite: opt.Overwrite = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes on this machine (torchrun, gloo): the calibration windows sharded across them, the statistics all-reduced; rank 0 writes. The same as `torchrun --nproc-per-node N -m qtool calibrate ...`.")] = 1,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
) -> None:
    """Run calibration data through a model and save reusable statistics.

    The model runs one decoder block at a time (block i+1's inputs are block i's outputs). For every Linear in the blocks the file holds its input Hessian (Σ XᵀX, with the token count), per-channel activation magnitudes (Σ|x|, max|x|) and the importance matrix (Σx²).

    Examples:

      qtool calibrate ./my-model --dataset wikitext2 -o stats.safetensors

      qtool calibrate ./my-model --dataset data.jsonl --samples 64 --seq-len 1024 -o stats.safetensors --imatrix model.imatrix.gguf

      qtool quantize ./my-model -m gptq -b 4 -g 128 --stats stats.safetensors
    """
    if not dataset:
        raise UsageError("--dataset is required: a .txt/.jsonl/.json/.parquet file, a recipe (e.g. wikitext2) or a Hub dataset id")
    recipe = QuantRecipe(method="calibrate", dataset=dataset, dataset_config=dataset_config, split=split,
                         text_field=text_field, samples=samples, seq_len=seq_len, seed=seed, ignore=list(ignore or []))
    if samples < 1 or seq_len < 2:
        raise UsageError(f"--samples {samples} / --seq-len {seq_len}: need >= 1 sample of >= 2 tokens")
    dest = out_path or Path(f"{Path(model.rstrip('/')).name}.stats.safetensors")
    if dest.suffix != ".safetensors":
        raise UsageError(f"--out {dest}: statistics are written as .safetensors")
    from qtool.cli.launch import check_nproc, launched, run_launched, session

    if nproc != 1 or launched():
        check_nproc(nproc, samples)
        if not launched():
            return run_launched(nproc)  # the same command under torchrun; rank 0 prints the summary
    with session("cpu") as comm, open_source(model, revision=revision, token=token, allow_pickle=allow_pickle) as source:
        check_model(source, model, trust_remote_code)
        with ProgressDisplay(not (json_out or quiet or not comm.is_writer)) as progress:
            report = run_calibration(model, source, dest, recipe, hessians=not no_hessian, imatrix_out=imatrix,
                                     overwrite=overwrite, on_event=progress)
    if not comm.is_writer:
        return
    if json_out:
        print_json(report.to_dict())
    else:
        print_summary(report)


def print_summary(r: CalibrationReport) -> None:
    c = r.calibration or {}
    t = Table(title=f"qtool calibrate → {r.output}", show_header=False, title_justify="left")
    t.add_row("data", f"{c.get('spec')}: {c.get('samples')} x {c.get('seq_len')} tokens ({r.tokens:,}), seed {c.get('seed')}")
    t.add_row("layers", f"{r.modules} linears, {r.distinct_inputs} distinct inputs")
    t.add_row("saved", ("Hessians (Σ XᵀX), " if r.hessians else "") + "Σx² (importance), Σ|x|, max|x|, token counts")
    if r.imatrix:
        t.add_row("imatrix", r.imatrix)
    t.add_row("size", human_bytes(r.output_bytes))
    t.add_row("time", f"{r.seconds:.1f} s")
    out.print(t)
