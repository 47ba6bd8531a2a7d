"""Choosing one candidate per tensor (a GGUF type, a bit-width) so that the total size fits a
budget and the total error is least: the multiple-choice knapsack problem, solved exactly.

minimise Σ_i e[i][x_i]  subject to  Σ_i c[i][x_i] <= B,  one x_i per item i.

1. Dominated candidates (no cheaper and no more accurate than another) are dropped.
2. Lagrangian relaxation: for a multiplier λ >= 0 every item independently picks the candidate
   minimising e + λ·c; the dual D(λ) = Σ_i min_j (e_ij + λ c_ij) − λ B is a lower bound on the
   optimum for every λ (any feasible x has Σ c <= B). λ* is found exactly by the greedy sweep over
   the items' lower-convex-hull steps in order of error saved per byte (the LP relaxation's
   solution); the sweep's last fitting point is the first incumbent, improved by single upgrades
   that still fit.
3. Lagrangian reduction: candidate j of item i can only be part of a solution better than the
   incumbent if D(λ*) − min_j' (e_ij' + λ* c_ij') + (e_ij + λ* c_ij) <= incumbent; all others are
   removed. Typically only the few items whose hull steps straddle λ* keep more than one candidate.
4. The items that kept several candidates are solved exactly by dynamic programming over their
   cost above their cheapest candidate, in units of the greatest common divisor of those cost
   differences (GGUF block sizes and packed widths make it large: 128 bytes and more), when the
   table (states x items) stays under DP_CELLS; otherwise by depth-first branch and bound with the
   same Lagrangian bound and the cheapest completion's cost, which is optimal when it finishes and
   past `node_limit` nodes stops with `bound` saying how far from optimal the answer can at most be.

`allocate_exhaustive` enumerates every combination: the reference the tests compare against.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

EPS = 1e-12
DP_CELLS = 50_000_000  # states x items of the exact table (one byte each for the back-pointers)


@dataclass(frozen=True)
class Allocation:
    picks: list[int]  # chosen candidate index per item (indices into the caller's lists)
    cost: int
    error: float
    bound: float  # a proven lower bound on the optimal error (== error when `optimal`)
    optimal: bool
    nodes: int = 0


class InfeasibleBudget(ValueError):
    """Even the cheapest candidate of every item exceeds the budget; `minimum` is their total."""

    def __init__(self, minimum: int, budget: int) -> None:
        super().__init__(f"the cheapest candidates need {minimum}, the budget is {budget}")
        self.minimum, self.budget = minimum, budget


def pareto(costs: list[int], errors: list[float]) -> list[int]:
    """Indices of the non-dominated candidates, by increasing cost (decreasing error)."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errors[j], j))
    keep: list[int] = []
    for j in order:
        if not keep or errors[j] < errors[keep[-1]] - EPS * max(1.0, abs(errors[keep[-1]])):
            if keep and costs[j] == costs[keep[-1]]:
                continue
            keep.append(j)
    return keep


def _hull(costs: list[int], errors: list[float], idx: list[int]) -> list[int]:
    """The lower convex hull of the Pareto candidates `idx` (cost ascending)."""
    hull: list[int] = []
    for j in idx:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-j: drop it
            if (errors[b] - errors[a]) * (costs[j] - costs[a]) >= (errors[j] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int, *, node_limit: int = 200_000) -> Allocation:
    """The least-error choice within `budget` (see the module docstring). Raises InfeasibleBudget."""
    n = len(costs)
    cand = [pareto(costs[i], errors[i]) for i in range(n)]
    minimum = sum(costs[i][cand[i][0]] for i in range(n))
    if minimum > budget:
        raise InfeasibleBudget(minimum, budget)
    lam, pick = _sweep(costs, errors, cand, budget)
    pick = _fill(costs, errors, cand, pick, budget)
    best_err = sum(errors[i][pick[i]] for i in range(n))
    red = [lambda_min(costs[i], errors[i], cand[i], lam) for i in range(n)]
    dual = sum(m for m, _ in red) - lam * budget
    if best_err - dual <= EPS * max(1.0, abs(best_err)):
        return Allocation(pick, sum(costs[i][pick[i]] for i in range(n)), best_err, best_err, True)
    # Lagrangian reduction
    keep = []
    for i in range(n):
        m_i = red[i][0]
        keep.append([j for j in cand[i] if dual - m_i + errors[i][j] + lam * costs[i][j] <= best_err + EPS * max(1.0, abs(best_err))])
    free = sorted((i for i in range(n) if len(keep[i]) > 1), key=lambda i: -(errors[i][keep[i][0]] - errors[i][keep[i][-1]]))
    fixed = [i for i in range(n) if len(keep[i]) == 1]
    base_c = sum(costs[i][keep[i][0]] for i in fixed)
    base_e = sum(errors[i][keep[i][0]] for i in fixed)
    exact = _dp(costs, errors, keep, free, budget - base_c)
    if exact is not None:
        pick = list(pick)
        for i in fixed:
            pick[i] = keep[i][0]
        for i, j in exact.items():
            pick[i] = j
        err = sum(errors[i][pick[i]] for i in range(n))
        return Allocation(pick, sum(costs[i][pick[i]] for i in range(n)), err, err, True)
    # suffix sums over the free items: Lagrangian minima and cheapest costs
    suf_m = [0.0] * (len(free) + 1)
    suf_c = [0] * (len(free) + 1)
    for k in range(len(free) - 1, -1, -1):
        i = free[k]
        suf_m[k] = suf_m[k + 1] + min(errors[i][j] + lam * costs[i][j] for j in keep[i])
        suf_c[k] = suf_c[k + 1] + min(costs[i][j] for j in keep[i])
    state = {"best": best_err, "pick": list(pick), "nodes": 0, "cut": False}
    choice = list(pick)
    for i in fixed:
        choice[i] = keep[i][0]

    def dfs(k: int, c: int, e: float) -> None:
        if state["nodes"] >= node_limit:
            state["cut"] = True
            return
        state["nodes"] += 1
        if k == len(free):
            if e < state["best"] - EPS * max(1.0, abs(state["best"])):
                state["best"], state["pick"] = e, list(choice)
            return
        if c + suf_c[k] > budget:
            return
        if e + suf_m[k] - lam * (budget - c) >= state["best"] - EPS * max(1.0, abs(state["best"])):
            return
        i = free[k]
        for j in sorted(keep[i], key=lambda j: errors[i][j] + lam * costs[i][j]):
            if c + costs[i][j] + suf_c[k + 1] <= budget:
                choice[i] = j
                dfs(k + 1, c + costs[i][j], e + errors[i][j])

    dfs(0, base_c, base_e)
    pick = state["pick"]
    err = sum(errors[i][pick[i]] for i in range(n))
    return Allocation(pick, sum(costs[i][pick[i]] for i in range(n)), err, dual if state["cut"] else err, not state["cut"],
                      state["nodes"])


def _dp(costs, errors, keep, free: list[int], room: int) -> dict[int, int] | None:
    """The free items' least-error choice with total cost <= `room`, exactly (None: table too big)."""
    import numpy as np

    if not free:
        return {}
    base = {i: min(costs[i][j] for j in keep[i]) for i in free}
    room -= sum(base.values())
    diffs = [costs[i][j] - base[i] for i in free for j in keep[i] if costs[i][j] > base[i]]
    g = math.gcd(*diffs) if diffs else 1
    states = room // g + 1
    if room < 0 or states * len(free) > DP_CELLS:
        return None
    best = np.zeros(states)  # least error of the items so far with cost <= s units
    back = np.empty((len(free), states), dtype=np.uint8)
    for k, i in enumerate(free):
        new = np.full(states, np.inf)
        arg = np.zeros(states, dtype=np.uint8)
        for a, j in enumerate(keep[i]):
            d = (costs[i][j] - base[i]) // g
            if d >= states:
                continue
            cand = np.full(states, np.inf)
            cand[d:] = best[: states - d] + errors[i][j]
            better = cand < new
            new[better], arg[better] = cand[better], a
        best, back[k] = new, arg
    out, s = {}, states - 1
    for k in range(len(free) - 1, -1, -1):
        i = free[k]
        j = keep[i][back[k][s]]
        out[i] = j
        s -= (costs[i][j] - base[i]) // g
    return out


def lambda_min(c: list[int], e: list[float], idx: list[int], lam: float) -> tuple[float, int]:
    vals = [(e[j] + lam * c[j], j) for j in idx]
    return min(vals)


def _sweep(costs, errors, cand, budget) -> tuple[float, list[int]]:
    """Greedy over hull steps by error saved per unit of cost: (λ*, the last fitting point)."""
    n = len(costs)
    hulls = [_hull(costs[i], errors[i], cand[i]) for i in range(n)]
    pick = [h[0] for h in hulls]
    used = sum(costs[i][pick[i]] for i in range(n))
    steps = []
    for i, h in enumerate(hulls):
        for a, b in zip(h, h[1:]):
            dc, de = costs[i][b] - costs[i][a], errors[i][a] - errors[i][b]
            steps.append((-(de / dc), i, a, b))
    steps.sort()
    for slope, i, a, b in steps:  # within an item, hull steps come out in order (slopes increase)
        if pick[i] != a:
            continue
        dc = costs[i][b] - costs[i][a]
        if used + dc > budget:
            return -slope, pick
        pick[i], used = b, used + dc
    return 0.0, pick


def _fill(costs, errors, cand, pick, budget) -> list[int]:
    """Single upgrades (to any Pareto candidate) that still fit, best error reduction first."""
    pick = list(pick)
    used = sum(costs[i][pick[i]] for i in range(len(pick)))
    while True:
        best = None
        for i in range(len(pick)):
            for j in cand[i]:
                dc = costs[i][j] - costs[i][pick[i]]
                gain = errors[i][pick[i]] - errors[i][j]
                if gain > 0 and used + dc <= budget and (best is None or gain > best[0]):
                    best = (gain, i, j, dc)
        if best is None:
            return pick
        _, i, j, dc = best
        pick[i], used = j, used + dc


def allocate_exhaustive(costs: list[list[int]], errors: list[list[float]], budget: int) -> tuple[float, list[int]] | None:
    """Every combination tried (the reference for tests): (least error, picks), None if none fits."""
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[i][j] for i, j in enumerate(combo))
        if c > budget:
            continue
        e = math.fsum(errors[i][j] for i, j in enumerate(combo))
        if best is None or e < best[0]:
            best = (e, list(combo))
    return best
