"""The budget solver (qtool/core/budget.py) against exhaustive enumeration: the same least error on
random instances (exact: it is an optimisation over finite sets), always within budget, and the
refusal below the cheapest total."""

from __future__ import annotations

import random

import pytest

from qtool.core.budget import InfeasibleBudget, allocate, allocate_exhaustive, pareto


def instance(rng: random.Random, items: int, cands: int):
    costs, errors = [], []
    for _ in range(items):
        size = rng.randint(1, 50)
        bits = sorted(rng.sample(range(2, 17), cands))
        costs.append([size * b + rng.randint(0, 3) for b in bits])
        # error falls with bits, roughly 4^-bits, with noise; sometimes a dominated candidate
        errors.append([size * (4.0 ** -b) * rng.uniform(0.5, 2.0) for b in bits])
    return costs, errors


@pytest.mark.parametrize("path", ["dp", "branch-and-bound"])
@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal(seed, path, monkeypatch):
    from qtool.core import budget

    if path == "branch-and-bound":
        monkeypatch.setattr(budget, "DP_CELLS", 0)  # the exact table refused: the search instead
    rng = random.Random(seed)
    costs, errors = instance(rng, rng.randint(1, 7), rng.randint(1, 4))
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi), (lo + hi) // 2}):
        ref = allocate_exhaustive(costs, errors, budget)
        got = allocate(costs, errors, budget)
        assert got.cost <= budget and got.cost == sum(costs[i][j] for i, j in enumerate(got.picks))
        assert got.optimal
        assert got.error == pytest.approx(ref[0], rel=1e-12, abs=1e-15)  # the same optimum (ties may pick other items)
        assert got.bound <= got.error + 1e-12


def test_node_limit_gives_a_proven_bound(monkeypatch):
    from qtool.core import budget as solver

    monkeypatch.setattr(solver, "DP_CELLS", 0)
    rng = random.Random(7)
    costs, errors = instance(rng, 60, 4)
    budget = (sum(min(c) for c in costs) + sum(max(c) for c in costs)) // 2
    cut = allocate(costs, errors, budget, node_limit=1)
    monkeypatch.setattr(solver, "DP_CELLS", 50_000_000)
    full = allocate(costs, errors, budget)
    assert full.optimal and cut.cost <= budget
    assert cut.bound <= full.error + 1e-12 <= cut.error + 1e-12  # the bound brackets the true optimum


def test_below_the_cheapest_total_is_refused_with_the_minimum():
    with pytest.raises(InfeasibleBudget) as e:
        allocate([[3, 5], [4, 9]], [[1.0, 0.5], [2.0, 0.1]], 6)
    assert e.value.minimum == 7


def test_pareto_drops_dominated_candidates():
    assert pareto([4, 2, 3, 5], [1.0, 2.0, 2.5, 1.0]) == [1, 0]
