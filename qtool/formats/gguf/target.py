"""GGUF `--target-bpw` / `--target-size`: every quantizable tensor's type chosen by qtool/target.py's
solver instead of a mixture's rules, among the types qtool writes that the tensor's row length
allows (256-wide K types on rows that are multiples of 256, 32-wide types on multiples of 32, F16
always). Tensors a `--tensor-type` pattern names keep that type and count against the budget.

Costs are the exact bytes of each type (GGML block sizes); errors are the importance-weighted
round-trip errors of sampled rows (the imatrix's column weights, which the K and legacy types also
use for their rounding here, as in the file that is then written).

Budgets: `--target-bpw` counts the quantizable tensors' bits per weight (what the run report's
"bits per weight" shows, scales included); `--target-size` the whole file: header and metadata
(measured by writing them to a scratch file), the tensors no type applies to (norms, F32
routers), 32 bytes of alignment per tensor at most, and the chosen tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import gguf
import torch

from qtool.formats.gguf import mixtures as mx
from qtool.formats.gguf.plan import Entry
from qtool.model.source import CheckpointSource
from qtool.target import (SAMPLE_EXPERTS, Choice, Target, choose, mean, proxy_error, sample_rows, small_work,
                          weighted_error)

T = gguf.GGMLQuantizationType
CANDIDATES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16)
# general.file_type for a chosen mix: the mixture named by its most used type
FILE_TYPE = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.Q6_K: "Q6_K", T.Q8_0: "Q8_0",
             T.Q4_0: "Q4_0", T.Q4_1: "Q4_1", T.Q5_0: "Q5_0", T.Q5_1: "Q5_1", T.F16: "F16"}


def candidates(ncols: int) -> list[T]:
    return [t for t in CANDIDATES if ncols % gguf.GGML_QUANT_SIZES[t][0] == 0]


def nbytes(shape: tuple[int, ...], t: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(shape) // block * size


def roundtrip(x: torch.Tensor, t: T, importance: torch.Tensor | None) -> torch.Tensor:
    """x [rows, cols] float32 through type t and back (the writer's own encoder)."""
    from qtool.formats.gguf import quants
    from qtool.formats.gguf.writer import _encode_chunk

    imp = importance.reshape(-1) if importance is not None and t in quants.IMATRIX_SUPPORTED else None
    return _encode_chunk(x.contiguous(), t, imp)[1]


def _slices(e: Entry, source: CheckpointSource) -> list[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """(sampled rows [r, cols] float32, their column importance or None, scale to the whole tensor)."""
    cols = e.ne[0]
    n_mat = len(e.sources) if len(e.sources) > 1 else 1
    picks = sorted({round(k * (n_mat - 1) / max(1, SAMPLE_EXPERTS - 1)) for k in range(min(n_mat, SAMPLE_EXPERTS))})
    out = []
    for k in picks:
        x = e.apply(source.get_tensor(e.sources[k] if n_mat > 1 else e.sources[0])).reshape(-1, cols)
        rows, scale = sample_rows(x)
        imp = None
        if e.importance is not None:
            imp = e.importance[k] if e.importance.shape[0] == n_mat else e.importance[0]
        out.append((rows, imp, scale * n_mat / len(picks)))
    return out


def allocate_types(entries: list[Entry], source: CheckpointSource, target: Target, *, pinned: set[str],
                   header_bytes: Callable[[], int], proxy: bool) -> Choice:
    """Set every free quantizable entry's `qtype` to the solver's choice; returns the choice."""
    allowed = [e for e in entries if e.const is None and mx.allows_quantization(e.name, e.ne)]
    free = [e for e in allowed if e.name not in pinned]
    pinned_bytes = sum(e.nbytes for e in allowed if e.name in pinned)
    labels = [[t.name for t in candidates(e.ne[0])] for e in free]
    costs = [[nbytes(e.shape, t) for t in candidates(e.ne[0])] for e in free]
    with small_work():
        errors = [_errors(e, source, proxy) for e in free]
    if target.bpw is not None:
        numel = sum(math.prod(e.shape) for e in allowed)
        budget = math.floor(target.bpw * numel / 8) - pinned_bytes
        units: Callable[[int], float] = lambda c: (c + pinned_bytes) * 8 / numel  # noqa: E731
        unit = "bits per weight"
    else:
        fixed = header_bytes() + sum(e.nbytes for e in entries if e not in free) + 32 * len(entries)
        budget = target.size - fixed  # type: ignore[operator]
        units, unit = (lambda c: c + fixed), "bytes"
    choice = choose([e.name for e in free], costs, errors, labels, budget, target, to_target_units=units, unit=unit,
                    proxy=proxy)
    by_name = {e.name: e for e in free}
    for name, j in choice.types.items():
        e = by_name[name]
        e.qtype, e.note = candidates(e.ne[0])[j], None
    return choice


def _errors(e: Entry, source: CheckpointSource, proxy: bool) -> list[float]:
    """The entry's importance-weighted error in each candidate type (a dry run: probe errors)."""
    types = candidates(e.ne[0])
    if proxy:
        numel, imp = math.prod(e.shape), mean(e.importance)
        return [proxy_error(lambda x, t=t: roundtrip(x, t, None), numel, imp) for t in types]
    parts = _slices(e, source)
    return [sum(weighted_error(x, roundtrip(x, t, imp), imp) * s for x, imp, s in parts) for t in types]


def file_type(entries: list[Entry]) -> mx.Mixture:
    """The mixture whose type holds the most quantized weights: what general.file_type says."""
    weights: dict[T, int] = {}
    for e in entries:
        if e.qtype in FILE_TYPE and e.const is None and mx.allows_quantization(e.name, e.ne):
            weights[e.qtype] = weights.get(e.qtype, 0) + math.prod(e.shape)
    top = max(weights, key=weights.__getitem__) if weights else T.F16
    return mx.MIXTURES[FILE_TYPE[top]]
