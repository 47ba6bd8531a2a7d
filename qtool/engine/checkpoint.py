"""Resume points of a block-level calibration run (`qtool quantize ... --resume`).

The block engine (engine/block_engine.py) calls a `BlockCheckpoint` at block boundaries and knows
nothing else about it: `completed` says how many blocks a resumed run may skip, `replay(b)` gives
back block b's items exactly as the engine yielded them, `inputs()` the hidden states the next
block starts from, and `save(b, items, next_inputs)` records one finished block. Everything about
files, fingerprints and refusals lives here.

On disk, beside the output (`out.parent / .<name>.qtool-checkpoint/`; the output's own temporary,
`.<name>.qtool-partial-<pid>`, is removed on any failure and carries the pid, and a GGUF output
is a single file, so the checkpoint cannot live inside it):

  fingerprint.json          what the run depends on: input files (bytes, sha256), recipe, the
                            per-layer specs, the calibration windows (spec, token count, sha256
                            of the token ids), qtool / torch / transformers versions
  block-00003.safetensors   block 3's items in yield order: quantized weights (codes, scales,
                            zero points, g_idx as held in memory), replaced float tensors, notes
                            and per-layer stats (JSON in the header metadata); tensors the engine
                            reads unchanged from the checkpoint are named, not copied
  inputs-00004.safetensors  the hidden states block 4 starts from, float32 [samples, 1, L, h]

Every file is written under a temporary name and renamed, block file first, then the next
inputs; then the previous inputs file is deleted. So after a kill at any instant, the blocks
0..k-1 whose files exist together with `inputs-k` form a consistent resume point, and a run
resumed from it computes block k from the very same float32 inputs: its bytes equal an
uninterrupted run's. Cost: about one byte per quantized weight (int8 codes) plus one activation
store on disk; the folder is removed when the output is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from qtool.core.codebook import CodebookWeight
from qtool.core.kquant import K_GRIDS, KScales
from qtool.core.qweight import NestedScale, QuantizedWeight
from qtool.errors import FormatError, UsageError
from qtool.qtypes import QType

SUFFIX = ".qtool-checkpoint"
FINGERPRINT = "fingerprint.json"


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoint of the output `out` lives (beside it, hidden)."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{SUFFIX}"


def has_checkpoint(out: Path) -> bool:
    return (checkpoint_dir(out) / FINGERPRINT).is_file()


def check_resumable(out: Path) -> None:
    """`--resume` for the output `out`: refused (exit 2) when no checkpoint exists for it. Cheap,
    so the CLI calls it before the model is opened or downloaded."""
    where = checkpoint_dir(out)
    if not has_checkpoint(out):
        raise UsageError(f"--resume: no checkpoint at {where} (no interrupted calibration run for {out}); "
                         "run without --resume")


def fingerprint(*, inputs: dict, recipe: dict | None, fmt: str, specs: dict, calibration: dict,
                input_ids: torch.Tensor | None) -> dict:
    """The record a checkpoint must match: input files (name -> bytes, sha256), the recipe, the
    output format and every layer's spec, the calibration windows and the library versions."""
    import transformers

    from qtool import __version__

    ids = None
    if input_ids is not None:
        t = input_ids.detach().cpu().contiguous().to(torch.int64)
        ids = {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()}
    return {
        "inputs": inputs,
        "recipe": recipe,
        "format": fmt,
        "specs": hashlib.sha256(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest(),
        "calibration": {**calibration, "input_ids": ids},
        "versions": {"qtool": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


ORDER = ("recipe", "format", "inputs", "calibration", "specs", "versions")  # what a user most likely changed, first


def _first_difference(a, b, path: str = "") -> str | None:
    """The first key path where two JSON values differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=lambda k: (ORDER.index(k) if not path and k in ORDER else len(ORDER), str(k)))
        for k in keys:
            if k not in a or k not in b:
                return f"{path}{k}"
            d = _first_difference(a[k], b[k], f"{path}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else path.rstrip(".") or "(root)"


def _describe(key: str, saved, now) -> str:
    def show(v):
        s = json.dumps(v, sort_keys=True, default=str)
        return s if len(s) <= 60 else s[:57] + "..."

    return f"{key}: {show(saved)} in the checkpoint, {show(now)} now"


def _lookup(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


class BlockCheckpoint:
    """One run's checkpoint folder. `resume=False` starts it afresh (an old one is removed);
    `resume=True` refuses (UsageError, exit 2) when there is none or its fingerprint differs."""

    def __init__(self, folder: Path, fp: dict, *, resume: bool) -> None:
        self.folder, self.fp = Path(folder), fp
        self.completed = 0
        if resume:
            self._open_existing()
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            try:
                self.folder.mkdir(parents=True)
                _write_atomic(self.folder / FINGERPRINT, json.dumps(fp, indent=1, sort_keys=True).encode())
            except OSError as e:
                raise FormatError(f"{self.folder}: cannot create the resume checkpoint: {e.strerror or e}") from None

    def _open_existing(self) -> None:
        where = self.folder
        try:
            saved = json.loads((where / FINGERPRINT).read_text())
        except FileNotFoundError:
            raise UsageError(f"--resume: no checkpoint at {where} (no interrupted calibration run for this output); "
                             "run without --resume") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume: the checkpoint at {where} is unreadable ({e}); run without --resume") from None
        diff = _first_difference(saved, self.fp)
        if diff is not None:
            raise UsageError(f"--resume: the checkpoint at {where} belongs to another run "
                             f"({_describe(diff, _lookup(saved, diff), _lookup(self.fp, diff))}); run without --resume to start over")
        self.completed = self.saved  # a block file whose next inputs were never written is redone

    # -- what the engine calls ---------------------------------------------------------------------
    def inputs(self, stream: str = "hidden") -> torch.Tensor:
        """The hidden states block `completed` starts from: float32 [samples, *sample shape];
        `stream="float"`: the float model's own (saved where the method's targets come from it)."""
        from safetensors import safe_open

        path = self.folder / _inputs_name(self.completed)
        try:
            with safe_open(str(path), framework="pt") as h:
                return h.get_tensor(stream)
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(f"{path}: damaged checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "run without --resume") from None

    def replay(self, b: int, read: Callable[[str], torch.Tensor]) -> list:
        """Block `b`'s items as the engine yielded them; `read(name)` gives checkpoint tensors."""
        from safetensors import safe_open

        from qtool.engine.block_engine import BlockNote
        from qtool.engine.blockwise import PassThrough, QuantizedLinear

        path = self.folder / _block_name(b)
        try:
            with safe_open(str(path), framework="pt") as h:
                manifest = json.loads(h.metadata()["qtool.items"])
                stored = {k: h.get_tensor(k) for k in h.keys()}
        except Exception as e:
            raise FormatError(f"{path}: damaged checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "run without --resume") from None
        out: list = []
        for i, it in enumerate(manifest):
            if it["kind"] == "note":
                out.append(BlockNote(it["text"]))
            elif it["kind"] == "pass":
                out.append(PassThrough(it["name"], stored[f"{i}.tensor"] if it["stored"] else read(it["name"])))
            else:
                w = stored[f"{i}.weight"] if it["stored"] else read(it["name"])
                out.append(QuantizedLinear(it["name"], w, _qw_from(it["qw"], stored, i), it["stats"], it["shares"]))
        return out

    def save(self, b: int, items: Iterable, next_inputs: torch.Tensor, replaced: set[str],
             next_float: torch.Tensor | None = None) -> None:
        """Record block `b` (its items in yield order; `replaced`: the tensor names whose values
        are not the checkpoint's, stored in full) and the inputs of block b + 1 (and the float
        model's stream there, `next_float`, where the method's targets come from it)."""
        from safetensors.torch import save_file

        from qtool.engine.block_engine import BlockNote
        from qtool.engine.blockwise import PassThrough

        manifest, tensors = [], {}
        for i, it in enumerate(items):
            if isinstance(it, BlockNote):
                manifest.append({"kind": "note", "text": it.text})
            elif isinstance(it, PassThrough):
                keep = it.name in replaced
                manifest.append({"kind": "pass", "name": it.name, "stored": keep})
                if keep:
                    tensors[f"{i}.tensor"] = it.tensor
            else:
                keep = it.name in replaced
                manifest.append({"kind": "quantized", "name": it.name, "stored": keep, "stats": _jsonable(it.stats),
                                 "shares": it.shares_hessian_with, "qw": _qw_meta(it.qw, tensors, i)})
                if keep:
                    tensors[f"{i}.weight"] = it.weight
        tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
        try:
            _save_atomic(save_file, tensors, self.folder / _block_name(b), {"qtool.items": json.dumps(manifest)})
            streams = {"hidden": next_inputs} if next_float is None else {"hidden": next_inputs, "float": next_float}
            _save_atomic(save_file, {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in streams.items()},
                         self.folder / _inputs_name(b + 1), {})
            (self.folder / _inputs_name(b)).unlink(missing_ok=True)
        except OSError as e:
            raise FormatError(f"{self.folder}: cannot write the resume checkpoint: {e.strerror or e}") from None

    @property
    def saved(self) -> int:
        """Complete blocks on disk now (what a --resume would skip)."""
        k = 0
        while (self.folder / _block_name(k)).is_file():
            k += 1
        while k > 0 and not (self.folder / _inputs_name(k)).is_file():
            k -= 1
        return k

    def discard(self) -> None:
        """The output is complete: the checkpoint has no further use."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _block_name(b: int) -> str:
    return f"block-{b:05d}.safetensors"


def _inputs_name(b: int) -> str:
    return f"inputs-{b:05d}.safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_atomic(save_file, tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata or None)
    os.replace(tmp, path)


def _jsonable(stats):
    """A method's per-layer stats (a dict or a dataclass of scalars) as JSON-able data."""
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        stats = dict(stats.__dict__)
    json.dumps(stats)  # a method storing non-JSON stats is a bug to see here, not at resume time
    return stats


# -- QuantizedWeight <-> tensors + JSON --------------------------------------------------------------
_DTYPES = {str(d): d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float8_e4m3fn,
                              torch.float16, torch.bfloat16, torch.float32)}


def _qw_meta(qw: QuantizedWeight, tensors: dict, i: int) -> dict:
    if isinstance(qw, CodebookWeight):
        tensors.update({f"{i}.codes": qw.codes, f"{i}.codebooks": qw.codebooks, f"{i}.scale": qw.scales})
        return {"codebook": {"in_group": qw.in_group, "bits": qw.bits}}
    q = qw.qtype
    meta = {"qtype": {"name": q.name, "kind": q.kind, "bits": q.bits, "qmin": q.qmin, "qmax": q.qmax,
                      "torch_dtype": str(q.torch_dtype), "signed_scale": q.signed_scale,
                      "levels": list(q.levels) if q.levels is not None else None, "default_group": q.default_group},
            "strategy": qw.strategy, "group_size": qw.group_size, "block": list(qw.block) if qw.block else None,
            "nested": None}
    for part in ("codes", "scale", "zero_point", "g_idx"):
        t = getattr(qw, part)
        if t is not None:
            tensors[f"{i}.{part}"] = t
    if qw.nested is not None:
        n = qw.nested
        meta["nested"] = {"offset": n.offset, "block": n.block}
        tensors.update({f"{i}.nested.codes": n.codes, f"{i}.nested.absmax": n.absmax, f"{i}.nested.table": n.table})
    if qw.kblock is not None:
        k = qw.kblock
        meta["kblock"] = k.grid.name
        tensors.update({f"{i}.kblock.{p}": t for p, t in (("d", k.d), ("sc", k.sc), ("dmin", k.dmin), ("m", k.m)) if t is not None})
    return meta


def _qw_from(meta: dict, stored: dict, i: int) -> QuantizedWeight:
    if "codebook" in meta:
        c = meta["codebook"]
        return CodebookWeight(stored[f"{i}.codes"], stored[f"{i}.codebooks"], stored[f"{i}.scale"], c["in_group"], c["bits"])
    q = meta["qtype"]
    qtype = QType(q["name"], q["kind"], q["bits"], q["qmin"], q["qmax"], _DTYPES[q["torch_dtype"]], q["signed_scale"],
                  tuple(q["levels"]) if q["levels"] is not None else None, q["default_group"])
    nested = None
    if meta["nested"] is not None:
        nested = NestedScale(stored[f"{i}.nested.codes"], stored[f"{i}.nested.absmax"], stored[f"{i}.nested.table"],
                             meta["nested"]["offset"], meta["nested"]["block"])
    kblock = None
    if meta.get("kblock"):
        kblock = KScales(K_GRIDS[meta["kblock"]], stored[f"{i}.kblock.d"], stored[f"{i}.kblock.sc"],
                         stored.get(f"{i}.kblock.dmin"), stored.get(f"{i}.kblock.m"))
    return QuantizedWeight(qtype, stored[f"{i}.codes"], stored[f"{i}.scale"], stored.get(f"{i}.zero_point"),
                           meta["strategy"], meta["group_size"], stored.get(f"{i}.g_idx"),
                           tuple(meta["block"]) if meta["block"] else None, nested, kblock)
