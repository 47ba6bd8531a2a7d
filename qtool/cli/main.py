"""Entry point: `qtool` (console script) and `python -m qtool`.

Start-up is kept cheap: the heavy commands (torch, transformers, datasets behind them) are
imported only when one of them runs (`qtool.cli.lazy`), so `qtool --help` stays well under a second."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool import __version__
from qtool.cli._app import DEBUG, handle_errors, out, print_json
from qtool.cli.lazy import LazyGroup, set_thread_defaults
from qtool.errors import EXIT_CODES

app = typer.Typer(
    cls=LazyGroup,
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


# name -> (module, function): imported when the command runs or its own --help is asked for
LazyGroup.lazy_commands.update(
    {
        "quantize": ("qtool.cli.quantize", "quantize"),
        "calibrate": ("qtool.cli.calibrate", "calibrate"),
        "export": ("qtool.cli.export", "export"),
        "eval": ("qtool.cli.eval", "evaluate"),
        "inspect": ("qtool.cli.inspect", "inspect"),
    }
)


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


def main() -> None:
    set_thread_defaults()  # before anything imports torch (libgomp reads its settings when loaded)
    app()
