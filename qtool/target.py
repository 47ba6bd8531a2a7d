"""`--target-bpw X` / `--target-size SIZE`: per-tensor types (GGUF) or bit-widths (compressed-
tensors, GPTQ) chosen to fit a budget with the least importance-weighted error.

For every tensor the solver may choose for, and every candidate type, two numbers:
* cost: the bytes the tensor takes in that type (exact: the format's block sizes / packing);
* error: Σ_rows Σ_cols w_c (x − x̂)², the squared error of the tensor's round trip through the
  type, weighted per input column by `w_c` = the mean x² of that column's activations (a llama.cpp
  imatrix or `qtool calibrate` statistics; all ones without them: plain weight error). It is
  measured on up to SAMPLE_ROWS evenly spaced rows of the tensor (up to SAMPLE_EXPERTS experts of a
  stacked MoE tensor) and scaled to the whole tensor: one extra read of the weights, a few
  quantizations of a small slice each. A dry run reads no weights: it ranks types by their error
  on a seeded Gaussian probe (`proxy`), which fixes the sizes exactly and the mix approximately.

The choice is qtool/core/budget.py's exact multiple-choice knapsack over these numbers: the least
total error whose total cost fits (optimal for the measured errors, or within the bound it reports).
Why the sum of per-tensor errors: with the activation weighting it is the standard second-order
estimate of the loss increase (each tensor's error contributes independently to first order),
which is what llama.cpp's imatrix and GPTQ's objective also minimise.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch

from qtool.core.budget import Allocation, InfeasibleBudget, allocate
from qtool.errors import UsageError

SAMPLE_ROWS = 64
SAMPLE_EXPERTS = 4
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30}


def parse_size(text: str) -> int:
    """`--target-size`: bytes, with an optional unit (4.5GB = 4.5e9, 3500MiB = 3500 * 2^20)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(f"--target-size {text!r}: expected a size such as 4.5GB, 3500MiB or 123456789 (bytes)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UsageError(f"--target-size {text!r}: must be positive")
    return n


@dataclass(frozen=True)
class Target:
    bpw: float | None = None
    size: int | None = None  # bytes of the whole output

    def describe(self) -> str:
        return f"{self.bpw:g} bits per weight" if self.bpw is not None else f"{self.size:,} bytes"

    def flag(self) -> str:
        return f"--target-bpw {self.bpw:g}" if self.bpw is not None else f"--target-size {self.size}"


def target_of(recipe) -> Target | None:
    if recipe is None or (recipe.target_bpw is None and recipe.target_size is None):
        return None
    return Target(recipe.target_bpw, recipe.target_size)


# -- errors ----------------------------------------------------------------------------------------
def sample_rows(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Up to SAMPLE_ROWS evenly spaced rows of a 2-D tensor (float32), and the factor that scales
    their error to the whole tensor."""
    rows = x.shape[0]
    if rows <= SAMPLE_ROWS:
        return x.float(), 1.0
    idx = torch.linspace(0, rows - 1, SAMPLE_ROWS).round().long()
    return x[idx].float(), rows / SAMPLE_ROWS


def weighted_error(x: torch.Tensor, xhat: torch.Tensor, importance: torch.Tensor | None) -> float:
    """Σ_rows Σ_cols w_c (x − x̂)², as ‖(x − x̂)·√w‖² (one fused norm; a float64 sum of squares is
    several times slower on CPU)."""
    d = x.float() - xhat.float()
    if importance is not None:
        d = d * importance.reshape(1, -1).float().clamp(min=0).sqrt()
    return float(torch.linalg.vector_norm(d)) ** 2


@contextlib.contextmanager
def small_work():
    """One intra-op thread while measuring errors on small slices: on a loaded machine, torch's
    thread hand-offs cost 10-50x the work itself at these sizes (measured: 16 ms against 1 ms for a
    256 x 512 norm on 2 busy cores). The previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def gaussian_probe(cols: int = 1024) -> torch.Tensor:
    return torch.randn(64, cols, generator=torch.Generator().manual_seed(0))


def proxy_error(roundtrip: Callable[[torch.Tensor], torch.Tensor], numel: int, mean_importance: float = 1.0,
                group: int | None = None) -> float:
    """A dry run's stand-in: the type's mean squared error on a seeded N(0, 1) probe (1024 columns,
    or a multiple of `group` near that), times the tensor's size (and its mean importance)."""
    x = gaussian_probe(1024 if not group else group * max(1, -(-1024 // group)))
    return weighted_error(x, roundtrip(x), None) / x.numel() * numel * mean_importance


# -- the choice ------------------------------------------------------------------------------------
@dataclass
class Choice:
    """The solver's answer for the run report."""

    types: dict[str, int]  # tensor name -> chosen candidate index
    allocation: Allocation
    budget: int  # bytes available to the chosen tensors
    note: str


def choose(names: list[str], costs: list[list[int]], errors: list[list[float]], labels: list[list[str]], budget: int,
           target: Target, *, to_target_units: Callable[[int], float], unit: str, proxy: bool) -> Choice:
    """Run the solver; below the cheapest total, a one-line refusal naming the minimum reachable."""
    def show(v: float) -> str:
        return f"{v:,.0f}" if unit.startswith("bytes") else f"{v:.4g}"

    try:
        a = allocate(costs, errors, budget)
    except InfeasibleBudget as e:
        smallest = sorted({labels[i][min(range(len(costs[i])), key=costs[i].__getitem__)] for i in range(len(names))})
        raise UsageError(f"{target.flag()}: below what the smallest types reach on this model "
                         f"({', '.join(smallest)}: minimum {show(to_target_units(e.minimum))} {unit}); "
                         f"choose at least that") from None
    how = "errors on a Gaussian probe (dry run: no weights read)" if proxy else "measured importance-weighted errors"
    status = "optimal" if a.optimal else f"within {100 * (a.error - a.bound) / max(a.error, 1e-30):.2g} % of the optimum"
    mix: dict[str, int] = {}
    for i, j in enumerate(a.picks):
        mix[labels[i][j]] = mix.get(labels[i][j], 0) + 1
    parts = ", ".join(f"{n} x {t}" for t, n in sorted(mix.items(), key=lambda kv: -kv[1]))
    note = (f"{target.flag()}: {show(to_target_units(a.cost))} {unit} reached ({parts}); allocation {status} "
            f"for the {how}")
    return Choice({n: j for n, j in zip(names, a.picks)}, a, budget, note)


def mean(x: torch.Tensor | None) -> float:
    return 1.0 if x is None else float(x.float().mean()) or 1.0


