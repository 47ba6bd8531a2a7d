"""`qtool inspect`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from qtool.cli import options as opt
from qtool.cli._app import handle_errors, human_bytes, out, print_json
from qtool.inspect import KIND_LABELS, InspectReport, calibration_file_summary, inspect_model

Ctx = Annotated[int, typer.Option("--ctx", min=1, help="Context length (tokens) for the KV-cache estimate.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Concurrent sequences for the KV-cache estimate.")]


@handle_errors
def inspect(
    model: Annotated[str, typer.Argument(help="Local folder, .safetensors/.gguf file, or Hub id (org/name).")],
    ctx: Ctx = 4096,
    batch: Batch = 1,
    revision: opt.Revision = None,
    token: opt.Token = None,
    json_out: opt.Json = False,
) -> None:
    """Show what a checkpoint holds, from its headers only: per layer kind the type, bits per
    weight, shapes, parameters and bytes; totals; the detected format and method; and the memory
    needed to run it (weights + a 16-bit KV cache for --ctx tokens × --batch sequences).

    A Hub id downloads config.json only; safetensors headers are read with HTTP range requests.

    Examples:

      qtool inspect ./smol-w4g64

      qtool inspect HuggingFaceTB/SmolLM2-135M-Instruct --ctx 8192 --batch 4

      qtool inspect model-Q4_K_M.gguf --json

      qtool inspect stats.safetensors           (a `qtool calibrate` file, or a llama.cpp imatrix)
    """
    summary = calibration_file_summary(model)
    if summary is not None:
        if json_out:
            print_json(summary)
        else:
            t = Table(title=f"qtool inspect {model}", show_header=False, title_justify="left")
            for k, v in summary.items():
                t.add_row(k, ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict)
                          else (human_bytes(v) if k == "bytes" else str(v)))
            out.print(t)
        return
    report = inspect_model(model, revision=revision, token=token, ctx=ctx, batch=batch)
    if json_out:
        print_json(report.to_dict())
        return
    out.print(_groups_table(report))
    out.print(_totals_table(report))


def _bits(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}".rstrip("0").rstrip(".")


def _shapes(shapes: list[dict]) -> str:
    text = ", ".join("×".join(map(str, s["shape"])) + (f" ({s['count']})" if s["count"] > 1 else "") for s in shapes[:3])
    return text + (f", +{len(shapes) - 3} more" if len(shapes) > 3 else "")


def _groups_table(r: InspectReport) -> Table:
    t = Table(title=f"qtool inspect {r.source}", title_justify="left")
    for col, just in (("kind", "left"), ("type", "left"), ("bits/w", "right"), ("shapes (count)", "left"),
                      ("params", "right"), ("bytes", "right")):
        t.add_column(col, justify=just, no_wrap=col != "shapes (count)")  # type: ignore[arg-type]
    for g in r.groups():
        t.add_row(KIND_LABELS[g["kind"]], g["type"], _bits(g["bits"]), _shapes(g["shapes"]),
                  f"{g['params']:,}", human_bytes(g["bytes"]))
    return t


def _totals_table(r: InspectReport) -> Table:
    t = Table(show_header=False, title="totals", title_justify="left")
    t.add_row("format", r.format + (f" ({r.format_detail})" if r.format_detail else ""))
    t.add_row("method", r.method)
    t.add_row("parameters", f"{r.params:,} ({r.params_quantized:,} quantized)")
    t.add_row("file bytes", f"{human_bytes(r.file_bytes)} in {len(r.files)} file(s)")
    t.add_row("bits per weight", f"{_bits(r.bpw_quantized)} quantized layers, {_bits(r.bpw_model)} whole model "
              "(scales and zero points included)")
    if r.kv_cache is None:
        t.add_row("memory", f"{human_bytes(r.tensor_bytes)} weights + KV cache unknown")
    else:
        t.add_row("memory", f"{human_bytes(r.memory_bytes or 0)} = {human_bytes(r.tensor_bytes)} weights + "
                  f"{human_bytes(r.kv_cache.bytes)} KV cache (ctx {r.ctx}, batch {r.batch}, 16-bit)")
    if r.metadata:
        tok = r.metadata.get("tokenizer", {})
        model = {k: v for k, v in r.metadata.items() if k != "tokenizer"}
        t.add_row("model", ", ".join(f"{k} {v}" for k, v in model.items()))
        if tok:
            t.add_row("tokenizer", ", ".join(f"{k} {v}" for k, v in tok.items() if v is not None))
    if r.architecture:
        a = r.architecture
        t.add_row("architecture", a["family"])
        t.add_row("qtool", " | ".join(f"{k}: {a[k]}" for k in ("quantize", "gguf", "calibration")))
    for n in r.notes:
        t.add_row("[yellow]note[/]", n)
    return t
