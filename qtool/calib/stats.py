"""Calibration statistics saved by `qtool calibrate` and reused by `qtool quantize --stats`.

One safetensors file. For every Linear inside the decoder blocks, keyed by its module name M
(`model.layers.0.self_attn.q_proj`), statistics of its input X [tokens, in] collected on the
*unquantized* model (block i+1 sees block i's float outputs):

  M.xtx      float32 [in, in]  Σ XᵀX (the GPTQ Hessian is 2/tokens · xtx)   -- unless --no-hessian
  M.sum_x2   float32 [in]      Σ x² per input channel (the importance matrix: mean x² = sum_x2/tokens)
  M.sum_abs  float32 [in]      Σ |x| per input channel (AWQ-style activation magnitude)
  M.max_abs  float32 [in]      max |x| per input channel
  M.tokens   int64   [1]       rows of X summed over

Linears fed the very same input tensor (q/k/v, gate/up) share one set, stored under the first of
them; `__metadata__["modules"]` maps every module to its owner and input width, so a reader never
guesses. Sums, not means, are stored so that files of several runs could be added exactly.

`__metadata__` (all strings, JSON where structured): `format` = "qtool.calib_stats", `version`,
`model` (the config facts that must match the model the stats are applied to), `modules`,
`calibration` (dataset, windows, seed, tokens: the provenance `qtool quantize` reports), `hessians`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import FormatError, UsageError

FORMAT_TAG = "qtool.calib_stats"
VERSION = "1"
VECTOR_KEYS = ("sum_x2", "sum_abs", "max_abs")
# config.json facts a stats file must agree on with the model it is applied to
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")


def fingerprint(config: dict) -> dict:
    return {k: config.get(k) for k in FINGERPRINT_KEYS if config.get(k) is not None}


def module_of(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def header_metadata(config: dict, modules: dict[str, dict], calibration: dict, hessians: bool) -> dict[str, str]:
    return {
        "format": FORMAT_TAG,
        "version": VERSION,
        "model": json.dumps(fingerprint(config), sort_keys=True),
        "modules": json.dumps(modules, sort_keys=True),
        "calibration": json.dumps(calibration, sort_keys=True, default=str),
        "hessians": "xtx" if hessians else "none",
    }


def block_tensors(bs) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """engine.blockwise.BlockStats -> (module table entries, tensors to save)."""
    modules = {module_of(t): {"owner": module_of(o), "in_features": bs.in_features[t]} for t, o in bs.owner.items()}
    tensors: dict[str, torch.Tensor] = {}
    for t in sorted(set(bs.owner.values())):
        m = module_of(t)
        if t in bs.xtx:
            tensors[f"{m}.xtx"] = bs.xtx[t]
        for key in VECTOR_KEYS:
            tensors[f"{m}.{key}"] = getattr(bs, key)[t]
        tensors[f"{m}.tokens"] = torch.tensor([bs.tokens[t]], dtype=torch.int64)
    return modules, tensors


@dataclass(frozen=True)
class ModuleEntry:
    owner: str
    in_features: int


class CalibStats:
    """A stats file opened lazily: the header is checked on open, tensors are read on demand."""

    def __init__(self, path: Path, flag: str = "--stats") -> None:
        from safetensors import safe_open

        self.path, self.flag = Path(path), flag
        if not self.path.is_file():
            raise UsageError(f"{flag} {self.path}: no such file (make one with `qtool calibrate MODEL --dataset ... -o {self.path.name}`)")
        try:
            self._f = safe_open(str(self.path), framework="pt")
            meta = self._f.metadata() or {}
            keys = set(self._f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise FormatError(f"{self.path}: not a readable safetensors file ({str(e).splitlines()[0]}); re-run `qtool calibrate`") from None
        if meta.get("format") != FORMAT_TAG:
            raise FormatError(f"{self.path}: not a qtool calibration stats file (no format tag {FORMAT_TAG!r}); "
                              "make one with `qtool calibrate`")
        if meta.get("version") != VERSION:
            raise FormatError(f"{self.path}: stats format version {meta.get('version')!r}, this qtool reads {VERSION!r}")
        try:
            self.model = json.loads(meta["model"])
            self.modules = {m: ModuleEntry(e["owner"], int(e["in_features"])) for m, e in json.loads(meta["modules"]).items()}
            self.calibration = json.loads(meta.get("calibration", "{}"))
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{self.path}: damaged stats header ({type(e).__name__}: {e})") from None
        self.has_hessians = meta.get("hessians") == "xtx"
        needed = {f"{e.owner}.{k}" for e in self.modules.values() for k in (*VECTOR_KEYS, "tokens")}
        if self.has_hessians:
            needed |= {f"{e.owner}.xtx" for e in self.modules.values()}
        missing = sorted(needed - keys)
        if missing:
            raise FormatError(f"{self.path}: damaged stats file, tensor {missing[0]} is missing ({len(missing)} in all)")

    # -- checks against the model they are applied to --------------------------------------------
    def check_model(self, config: dict, weights: dict[str, tuple[int, ...]]) -> None:
        """`weights`: tensor name -> shape of every layer the run will quantize with these stats."""
        mine = fingerprint(config)
        diff = [k for k in FINGERPRINT_KEYS if k in mine and k in self.model and mine[k] != self.model[k]]
        if diff:
            k = diff[0]
            raise UsageError(f"{self.flag} {self.path}: made for another model ({k} {self.model[k]} there, {mine[k]} here); "
                             "run `qtool calibrate` on this model")
        for name, shape in weights.items():
            m = module_of(name)
            e = self.modules.get(m)
            if e is None:
                raise UsageError(f"{self.flag} {self.path}: no statistics for {m} (made for another model, or with other "
                                 "--target/--ignore?); run `qtool calibrate` on this model")
            if e.in_features != shape[-1]:
                raise UsageError(f"{self.flag} {self.path}: {m} has {shape[-1]} inputs here, {e.in_features} in the stats file "
                                 "(made for another model); run `qtool calibrate` on this model")

    # -- reading -----------------------------------------------------------------------------------
    def _tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self._f.get_tensor(key)
        if tuple(t.shape) != shape:
            raise FormatError(f"{self.path}: tensor {key} has shape {tuple(t.shape)}, expected {shape} (damaged file)")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FormatError(f"{self.path}: tensor {key} holds NaN/Inf (damaged file); re-run `qtool calibrate`")
        return t

    def tokens(self, module: str) -> int:
        e = self.modules[module]
        n = int(self._tensor(f"{e.owner}.tokens", (1,))[0])
        if n < 1:
            raise FormatError(f"{self.path}: {e.owner}.tokens = {n} (damaged file)")
        return n

    def hessian(self, module: str) -> torch.Tensor:
        """GPTQ's H = 2/n Σ XᵀX for `module` (its owner's, when the input is shared)."""
        if not self.has_hessians:
            raise UsageError(f"{self.flag} {self.path}: saved without Hessians (--no-hessian); GPTQ needs them")
        e = self.modules[module]
        return self._tensor(f"{e.owner}.xtx", (e.in_features, e.in_features)) * (2.0 / self.tokens(module))

    def vector(self, module: str, key: str) -> torch.Tensor:
        e = self.modules[module]
        return self._tensor(f"{e.owner}.{key}", (e.in_features,))

    def importance(self) -> dict[str, tuple[torch.Tensor, int]]:
        """{module: (Σ x² per input channel, tokens)}: what an importance matrix is made of."""
        return {m: (self.vector(m, "sum_x2"), self.tokens(m)) for m in self.modules}

    def close(self) -> None:
        self._f = None
