"""The CLI's one console, its error-to-exit-code mapping, and progress display.

This package is the only code that imports typer or rich, prints, or exits."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextvars import ContextVar
from typing import Any, Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qtool.errors import QtoolError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# Set by `qtool --debug` for the duration of one invocation (reset when the root context closes),
# so an in-process caller running several commands never inherits it.
DEBUG: ContextVar[bool] = ContextVar("qtool_debug", default=False)


def debug_enabled() -> bool:
    """`qtool --debug ...`, or QTOOL_DEBUG=1 in the environment."""
    return DEBUG.get() or os.environ.get("QTOOL_DEBUG", "") not in ("", "0")


def handle_errors(fn: Callable) -> Callable:
    """Map exceptions to one-line messages and exit codes (see qtool/errors.py); --debug re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QtoolError as e:
            if debug_enabled():
                raise
            err.print(f"[bold red]error:[/] {_ranked(e.exit_code, str(e))}", markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print(_ranked(130, "interrupted; nothing was written"))
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: say so in one line, traceback with --debug
            if debug_enabled():
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            msg = _ranked(1, f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)")
            err.print(f"[bold red]{msg}[/]" if not msg.startswith("rank") else msg, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _ranked(code: int, message: str) -> str:
    """Under torchrun, the rank's error line names the rank (and is kept for the launcher: cli/launch.py)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return message
    from qtool.cli.launch import record_failure

    return record_failure(code, message)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


class ProgressDisplay:
    """Turns pipeline events into rich progress bars; silent when not a TTY or when asked."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[item]}", style="dim"),
                console=err,
                transient=True,
            )
            self.progress.__enter__()
        return self

    def __call__(self, event: Any) -> None:
        if not self.progress:
            return
        if event.stage not in self.tasks:
            self.tasks[event.stage] = self.progress.add_task(event.stage, total=event.total, item="")
        self.progress.update(self.tasks[event.stage], completed=event.done, total=event.total, item=event.item[-60:])

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.__exit__(*exc)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
