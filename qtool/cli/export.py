"""`qtool export`."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer

from qtool.cli import options as opt
from qtool.cli._app import ProgressDisplay, handle_errors, human_bytes, out, print_json
from qtool.errors import UnsupportedError, UsageError
from qtool.formats import FORMATS
from qtool.convert import plan_repack
from qtool.model.dequantized_source import DequantizedSource
from qtool.model.quantized_source import QuantizedSource, open_quantized
from qtool.model.resolve import open_source
from qtool.pipeline import run
from qtool.publish import check_push_flags, push

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16, "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32}


@handle_errors
def export(
    model: Annotated[str, typer.Argument(help="Checkpoint to convert: folder, .safetensors/.gguf file, or Hub id.")],
    fmt: opt.Format = "safetensors",
    gguf_type: opt.GGUFType = None,
    imatrix: opt.Imatrix = None,
    out_path: opt.Out = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Float dtype of the written tensors: bf16, f16, f32 (default: bf16 from GGUF, else unchanged).")] = None,
    revision: opt.Revision = None,
    token: opt.Token = None,
    allow_pickle: opt.AllowPickle = False,
    overwrite: opt.Overwrite = False,
    push_to_hub: opt.PushToHub = None,
    private: opt.Private = False,
    push_branch: opt.PushBranch = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
) -> None:
    """Write an existing checkpoint in another format.

    Examples:

      qtool export SmolLM2-135M-Instruct.Q4_1.gguf -f safetensors -o smollm2-bf16

      qtool export ./model-fp32 -f safetensors --dtype bf16 -o model-bf16

      qtool export ./my-model -f gguf -t Q4_K_M --imatrix imatrix.gguf -o my-model-Q4_K_M.gguf
    """
    writer_cls = FORMATS.get(fmt)
    repack = writer_cls.quantizes and not writer_cls.self_quantizing  # only from a quantized checkpoint (qtool/convert.py)
    if dtype is not None and dtype.lower() not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of bf16, f16, f32")
    if out_path is None:
        raise UsageError("--out/-o is required for export")
    publish = check_push_flags(push_to_hub, token, private, push_branch, overwrite)  # before any weight is read
    writer = writer_cls(dtype=DTYPES[dtype.lower()] if dtype else None, type=gguf_type, imatrix=imatrix)
    # a writer that re-quantizes (GGUF types) starts from the exact float32 dequantization of a
    # quantized checkpoint, so the error it reports is the one added to that checkpoint's weights
    exact = torch.float32 if writer_cls.self_quantizing else None
    with open_source(model, revision=revision, token=token, allow_pickle=allow_pickle, dequantize_dtype=exact) as raw:
        source = open_quantized(raw)  # a quantized folder: layers dequantized, or repacked as stored
        recipe = method = None
        if repack and not isinstance(source, QuantizedSource):
            usable = [n for n, c in FORMATS if not c.quantizes or c.self_quantizing]
            raise UnsupportedError(f"qtool export -f {writer_cls.registry_name}: {model} is not quantized; use `qtool quantize`, "
                                   f"or export to: {', '.join(usable)}")
        if repack:
            recipe, method = plan_repack(source, writer)  # type: ignore[arg-type]
        with ProgressDisplay(not (json_out or quiet)) as progress:
            report = run(model, source, out_path, writer, recipe, overwrite=overwrite, on_event=progress, method=method)
    if publish is not None:
        report.published = push(out_path, publish, progress=not (json_out or quiet))
    d = {k: v for k, v in report.to_dict().items() if k in ("model", "output", "format", "seconds", "input_bytes", "output_bytes", "params_total", "published")}
    notes = [n for n in [getattr(writer, "imatrix_note", None)] if n]
    if isinstance(source, QuantizedSource):
        kept = f"codes kept exactly ({len(report.layers)} layers)" if repack else "dequantized"
        notes.append(f"from {source.layout.label}: {kept}")
    elif isinstance(source, DequantizedSource):
        notes.append(f"from {source.method}: dequantized" + (" (float32)" if exact else ""))
    full = report.to_dict()
    if writer_cls.self_quantizing and full["sqnr_db_min"] is not None:  # the error the re-quantization added, per tensor
        worst = min(report.layers, key=lambda r: r.sqnr_db)
        d.update(sqnr_db_mean=full["sqnr_db_mean"], sqnr_db_min=full["sqnr_db_min"],
                 layers=[{"name": r["name"], "type": r["strategy"], "sqnr_db": r["sqnr_db"]} for r in full["layers"]])
        notes.append(f"{report.format} re-quantization error vs the source weights: SQNR mean {full['sqnr_db_mean']} dB, "
                     f"worst {full['sqnr_db_min']} dB ({worst.name}), {len(report.layers)} tensors")
    if json_out:
        print_json({**d, "notes": notes} if notes else d)
    else:
        out.print(f"wrote {report.output} ({report.format}, {report.params_total:,} parameters, {human_bytes(report.output_bytes)}) in {report.seconds:.1f} s")
        for n in notes:
            out.print(f"note: {n}")
        if report.published:
            out.print(f"published {report.published['url']} ({len(report.published['files'])} files)")
