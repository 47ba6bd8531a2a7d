"""Method parameters, declared once per method (a `MethodParams` dataclass on `QuantMethod.params`),
read here into what the CLI, recipe files and the contract tests need.

A field `block_size: int = field(default=128, metadata={"help": ...})` of GPTQParams becomes the
`qtool quantize` option `--block-size` (in the "gptq options" help panel; booleans as
`--flag/--no-flag`), the key `block_size` of a recipe's `method_params`, and a validation: a value
for a method that does not declare it is refused naming the option and the method. Two methods
declaring the same field share one CLI option (its help panel lists both).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from qtool.errors import UsageError


@dataclass
class MethodOption:
    field: str  # the dataclass field / method_params key
    flag: str  # --field-name
    type: type  # bool, int, float or str
    help: str
    methods: list[str]  # registered methods declaring it
    defaults: dict[str, object]  # method -> its default


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def fields_of(params_cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(params_cls)) if params_cls is not None else []


def _field_type(params_cls, f: dataclasses.Field) -> type:
    t = typing.get_type_hints(params_cls).get(f.name, f.type)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(t)) == 2:  # `float | None`: None = a default the method derives (autoround's lr)
        t = args[0]
    if t not in (bool, int, float, str):
        raise TypeError(f"{params_cls.__name__}.{f.name}: method parameters are bool, int, float or str, not {t}")
    return t


def method_options() -> list[MethodOption]:
    """Every registered method's declared parameters, one entry per distinct field name."""
    from qtool.methods import METHODS

    out: dict[str, MethodOption] = {}
    for name, cls in METHODS:
        for f in fields_of(getattr(cls, "params", None)):
            t = _field_type(cls.params, f)
            opt = out.get(f.name)
            if opt is None:
                opt = out[f.name] = MethodOption(f.name, flag_of(f.name), t, f.metadata.get("help", ""), [], {})
            elif opt.type is not t:
                raise TypeError(f"{f.name}: declared as {opt.type.__name__} by {opt.methods[0]}, as {t.__name__} by {name}")
            opt.methods.append(name)
            opt.defaults[name] = f.default
    return list(out.values())


def resolve(method: str, given: dict[str, object]) -> dict[str, object]:
    """The method's full parameter set (declared defaults + `given`), validated by its dataclass.
    A key the method does not declare is refused, naming the option."""
    from qtool.methods import METHODS

    cls = METHODS.get(method)
    params_cls = getattr(cls, "params", None)
    known = {f.name for f in fields_of(params_cls)}
    foreign = [k for k in given if k not in known]
    if foreign:
        mine = ", ".join(flag_of(k) for k in sorted(known)) or "none"
        raise UsageError(f"{', '.join(flag_of(k) for k in foreign)}: not an option of --method {method} (its options: {mine})")
    if params_cls is None:
        return {}
    given = with_yields(params_cls, given)
    for k, v in given.items():
        t = _field_type(params_cls, next(f for f in fields_of(params_cls) if f.name == k))
        if not _is(v, t):
            raise UsageError(f"{flag_of(k)} {v!r}: expected {t.__name__}")
    try:
        inst = params_cls(**given)
    except TypeError as e:
        raise UsageError(f"--method {method}: {e}") from None
    return dataclasses.asdict(inst)


def with_yields(params_cls, given: dict[str, object]) -> dict[str, object]:
    """`given` plus the defaults that give way to another option given alone: a params class's
    `yields_to = {trigger: (other, value)}` sets `other` to `value` when `trigger` is given True and
    `other` is not given (gptq: --act-order turns the group-aware default off; both given stays the
    dataclass's error)."""
    for trigger, (other, value) in getattr(params_cls, "yields_to", {}).items():
        if given.get(trigger) is True and other not in given:
            given = {**given, other: value}
    return given


def _is(v: object, t: type) -> bool:
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)
