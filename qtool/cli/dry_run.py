"""`qtool quantize ... --dry-run`: the plan as tables (or JSON with --json)."""

from __future__ import annotations

from collections import defaultdict

from rich.table import Table

from qtool.cli._app import out
from qtool.estimate import human, seconds_text


def print_dry_run(r) -> None:
    t = Table(title=f"qtool quantize --dry-run {r.model}", show_header=False, title_justify="left")
    t.add_row("model", f"{r.source}: {r.params_total:,} parameters, {human(r.input_bytes)} of weights (nothing read but headers)")
    rec = r.recipe
    t.add_row("recipe", f"{rec['method']} {rec['qtype']} " + (f"g{rec['group_size']}" if rec["group_size"] else f"per-{rec['strategy']}")
              + (" sym" if rec["symmetric"] else " asym") + (f", calibration {rec['dataset']} {rec['samples']} x {rec['seq_len']}" if rec["dataset"] else ""))
    for run in r.runs:
        what = f" {run.format_type}" if run.format_type else ""
        if run.output_bytes is not None:
            sizes = ", ".join(f"{f} {human(b)}" for f, b in run.sizes.items()) if len(run.sizes) > 1 else human(run.output_bytes)
            bpw = f"{run.bpw:.3f}" if run.bpw is not None else "-"
            t.add_row(f"{run.format}{what}", f"-> {run.output}: ~{sizes}; {len(run.layers)} tensors quantized "
                      f"({run.params_quantized:,} weights), {bpw} bits per weight (scales and zeros included)")
        else:
            t.add_row(f"{run.format}{what}", f"-> {run.output}: not planned (refused, below)")
        for n in run.notes:
            t.add_row("[yellow]note[/]", n)
    if r.peak_memory_bytes is not None:
        t.add_row("peak memory", f"~{human(r.peak_memory_bytes)}: " + "; ".join(f"{k} {human(v)}" for k, v in r.memory_terms.items()))
    if r.seconds is not None or r.time_how:
        t.add_row("time", (f"~{seconds_text(r.seconds)}: " if r.seconds is not None else "") + r.time_how)
    for x in r.refusals:
        t.add_row(f"[bold red]refused (exit {x.exit_code})[/]", f"{x.stage}{' ' + x.format if x.format else ''}: {x.message}")
    if not r.refusals:
        t.add_row("[green]refusals[/]", "none found; the run would start")
    for n in r.not_checked:
        t.add_row("not checked", n)
    out.print(t)
    for run in r.runs:
        if run.layers:
            out.print(_layer_table(run))


def _layer_table(run) -> Table:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for layer in run.layers:
        name = layer["name"].removesuffix(".weight")
        kinds[name.rsplit(".", 1)[-1] if not name[-1].isdigit() else name].append(layer)
    k = Table("layer kind", "tensors", "types", "weights", "bits per weight", title=f"{run.format}: what is quantized, how",
              title_justify="left")
    for kind, layers in kinds.items():
        n = sum(_numel(x["shape"]) for x in layers)
        types = ", ".join(sorted({x["type"] for x in layers}))
        k.add_row(kind, str(len(layers)), types, f"{n:,}", f"{sum(x['bits'] for x in layers) / n:.3f}")
    return k


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
