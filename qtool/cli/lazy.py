"""Cheap start-up: commands imported only when they run, and thread defaults set before torch loads.

`qtool --help` must not pay for torch, transformers or datasets (seconds of CPU): the root help
lists each lazy command from its function's docstring, read from the module's source with `ast`,
and the module itself is imported only when that command is resolved to run (or for its own
`--help`)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
from functools import lru_cache
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand, TyperGroup

# libgomp spin-waits by default: on a busy machine (or with more threads than free cores) idle
# workers burn the CPU the busy ones need; one bench run took four times as long. PASSIVE makes
# them sleep. Read by libgomp when torch loads it, so it must be set before `import torch`.
THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_thread_defaults(environ: Any = None) -> dict[str, str]:
    """Set qtool's thread defaults where the user has not set them; returns what was set."""
    environ = os.environ if environ is None else environ
    set_now = {k: v for k, v in THREAD_DEFAULTS.items() if not environ.get(k)}
    environ.update(set_now)
    return set_now


@lru_cache(maxsize=None)
def docstring_of(module: str, function: str) -> str:
    """The cleaned docstring of `module.function`, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ImportError(f"no module named {module!r}")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    wrapped = {}  # `quantize = with_method_options(_quantize)`: the command is a wrapped function
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args:
            arg = node.value.args[0]
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(arg, ast.Name):
                    wrapped[target.id] = arg.id
    node = funcs.get(function) or funcs.get(wrapped.get(function, ""))
    if node is None:
        raise ImportError(f"{module} defines no function {function!r}")
    return inspect.cleandoc(ast.get_docstring(node, clean=False) or "")


def load_command(name: str, module: str, function: str) -> TyperCommand:
    """The real click command for `module.function`, built the way `app.command(name)` builds it."""
    fn = getattr(importlib.import_module(module), function)
    single = typer.Typer()
    single.command(name)(fn)
    return typer.main.get_command(single)


class LazyGroup(TyperGroup):
    """A typer group whose `lazy_commands` (name -> (module, function)) load on first use.

    Listing (the root help) shows a stand-in carrying the docstring; resolving a command to run
    it imports the module and replaces the stand-in with the real command."""

    lazy_commands: ClassVar[dict[str, tuple[str, str]]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        eager = super().list_commands(ctx)
        return [n for n in self.lazy_commands if n not in eager] + eager

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands or cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module, function = self.lazy_commands[cmd_name]
        return TyperCommand(name=cmd_name, help=docstring_of(module, function), callback=None)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in self.lazy_commands and args[0] not in self.commands:
            name = args[0]
            self.commands[name] = load_command(name, *self.lazy_commands[name])
        return super().resolve_command(ctx, args)
