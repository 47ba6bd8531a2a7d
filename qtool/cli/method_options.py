"""`qtool quantize`'s method options, generated from the methods' parameter declarations
(qtool/methods/params.py): one typer option per declared field, in a help panel per method."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Callable, Optional

import typer

from qtool.methods.params import MethodOption, method_options


def _parameter(opt: MethodOption) -> inspect.Parameter:
    panel = " / ".join(opt.methods) + " options"
    vals = {m: ("yes" if d is True else "no" if d is False else d) for m, d in opt.defaults.items()}
    defaults = ", ".join(f"{m} {d}" for m, d in vals.items()) if len(vals) > 1 else str(next(iter(vals.values())))
    help_ = f"{opt.help} (default: {defaults})".strip()  # parentheses: rich would take [..] for markup
    decl = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool else opt.flag
    info = typer.Option(decl, help=help_, rich_help_panel=panel, show_default=False)
    return inspect.Parameter(opt.field, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[opt.type], info])


def with_method_options(fn: Callable) -> Callable:
    """`fn(..., **method_options)` as a typer command whose signature has every method option;
    `fn` receives them as keyword arguments (None where not given)."""
    sig = inspect.signature(fn, eval_str=True)
    base = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in base}
    extra = [_parameter(o) for o in method_options()]
    clash = [p.name for p in extra if p.name in taken]
    if clash:
        raise TypeError(f"method option {clash[0]!r} clashes with a `quantize` option of the same name")

    @functools.wraps(fn)
    def command(**kwargs):
        return fn(**kwargs)

    params = base + extra
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must see this signature, not fn's
    return command
