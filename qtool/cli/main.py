"""Entry point: `qtool` (console script) and `python -m qtool`."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool import __version__
from qtool.cli import calibrate as calibrate_cmd
from qtool.cli import eval as eval_cmd
from qtool.cli import export as export_cmd
from qtool.cli import quantize as quantize_cmd
from qtool.cli._app import DEBUG, handle_errors, out, print_json
from qtool.errors import EXIT_CODES

app = typer.Typer(
    name="qtool",
    help="Quantize LLM checkpoints into formats real runtimes load.\n\nExit codes: "
    + "; ".join(f"{k} {v.split(':')[0]}" for k, v in EXIT_CODES.items()),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if debug:
        token = DEBUG.set(True)
        ctx.call_on_close(lambda: DEBUG.reset(token))


app.command("quantize")(quantize_cmd.quantize)
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("export")(export_cmd.export)
app.command("eval")(eval_cmd.evaluate)


@app.command("formats")
@handle_errors
def formats(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the registered methods and output formats.

    Example:  qtool formats --json
    """
    from qtool.formats import FORMATS
    from qtool.methods import METHODS

    data = {
        "methods": {n: (c.__doc__ or "").strip().splitlines()[0] for n, c in METHODS},
        "formats": {n: (c.__doc__ or "").strip().splitlines()[0] for n, c in FORMATS},
    }
    if json_out:
        print_json(data)
        return
    for kind, items in data.items():
        out.print(f"[bold]{kind}[/]")
        for n, doc in items.items():
            out.print(f"  {n:22} {doc}")


try:  # `inspect` lives in its own module; registered here so the command list stays in one place
    from qtool.cli import inspect as inspect_cmd

    app.command("inspect")(inspect_cmd.inspect)
except ImportError as e:  # only while the module does not exist yet; any other import error surfaces
    if "qtool.cli.inspect" not in str(e) and "cannot import name 'inspect'" not in str(e):
        raise


def main() -> None:
    app()
