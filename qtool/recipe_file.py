"""`qtool quantize --recipe FILE`: a recipe in YAML or JSON with the fields of QuantRecipe
(qtool/config.py), as the model card's "Recipe" section records them; the method's own options sit
under `method_params` and are validated by its declaration (qtool/methods/params.py). Options
given on the command line override the file's values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qtool.config import QuantRecipe
from qtool.errors import UsageError

FIELDS = {f.name for f in dataclasses.fields(QuantRecipe)}
# make_recipe keyword -> the `qtool quantize` parameter that sets it
CLI_NAME = {"targets": "target", "fmt": "fmt", "asym": "asym", "group_size": "group_size", "qtype": "qtype"}


def load_recipe_file(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--recipe {path}: no such file (YAML or JSON with the fields of a model card's recipe)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise several types
        raise UsageError(f"--recipe {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--recipe {path}: expected a mapping of recipe fields, got {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise UsageError(f"--recipe {path}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    if not isinstance(data.get("method_params", {}) or {}, dict):
        raise UsageError(f"--recipe {path}: method_params must be a mapping")
    return data


def recipe_kwargs(data: dict) -> dict:
    """A recipe file's fields -> make_recipe keywords."""
    out: dict = {}
    for k, v in data.items():
        if k == "format":
            out["fmt"] = v
        elif k == "symmetric":
            out["asym"] = None if v is None else not v
        elif k in ("strategy", "group_size"):
            continue
        else:
            out[k] = v
    if "group_size" in data or "strategy" in data:
        g, strategy = data.get("group_size"), data.get("strategy")
        out["group_size"] = str(g) if g is not None else (strategy or "channel")
    return out


def merge(cli: dict, explicit: set[str], filed: dict) -> dict:
    """make_recipe keywords: the file's, overridden by options given on the command line (`explicit`:
    their make_recipe names). Method options merge key by key."""
    out = dict(cli)
    for k, v in filed.items():
        if k == "method_params":
            continue
        if k == "qtype":
            if not ({"bits", "qtype"} & explicit):
                out["qtype"], out["bits"] = v, None
            continue
        if k not in explicit:
            out[k] = v
    params = dict(filed.get("method_params") or {})
    if "method" in explicit and cli.get("method") != filed.get("method"):
        params = {}  # another method than the file's: its options do not apply
    params.update({k: v for k, v in (cli.get("method_params") or {}).items() if v is not None})
    out["method_params"] = params
    return out
