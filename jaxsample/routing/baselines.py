"""The per-query baseline: argmax_j (â_ij − λ c_ij), λ tuned on budget, plus its repair.

RouterBench-style willingness to pay. Each query is routed on its own, so the rule can
exceed the batch budget or a model's capacity; `repair` makes it feasible the way a
serving system would (spec §3.5, a **reconstruction**): capacity overflow, in arrival
order, goes to the cheapest model with room; budget overflow downgrades the latest
arrivals to cheaper models with room.
"""

from __future__ import annotations

import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.routing.batch import check_assignment, check_problem, check_scores_costs


def per_query_route(scores, costs, lam: float) -> np.ndarray:
    """int `[n]`: each query's argmax_j (â_ij − λ c_ij); ties go to the cheaper model.

    Raises `ArgumentError` on non-finite scores or costs (a NaN utility would never be the
    maximum, so its query would fall to model 0 unnoticed).
    """
    scores, costs = check_scores_costs(scores, costs)
    if not np.isfinite(lam) or lam < 0:
        raise ArgumentError(f"lam must be a finite number ≥ 0, got {lam}")
    utility = scores - lam * costs
    best = utility.max(axis=1, keepdims=True)
    # among maximisers the cheapest: mask the others with +inf cost
    return np.argmin(np.where(utility >= best, costs, np.inf), axis=1)


def tune_lambda(batches, budget: float, *, iterations: int = 60) -> float:
    """The smallest λ whose per-query rule meets `budget` in mean cost over `batches`.

    Args:
      batches: iterable of `(scores [n, M], costs [n, M])` validation batches.
      budget: the per-batch budget C_B.

    Mean cost falls as λ grows (each query's choice moves to cheaper models), so bisection
    on [0, λ_max] finds the boundary; λ_max makes every query take its cheapest model.
    """
    batches = [(np.asarray(s, np.float64), np.asarray(c, np.float64)) for s, c in batches]
    if not batches:
        raise ArgumentError("tune_lambda needs at least one validation batch")

    def mean_cost(lam: float) -> float:
        return float(np.mean([c[np.arange(len(c)), per_query_route(s, c, lam)].sum() for s, c in batches]))

    if mean_cost(0.0) <= budget:
        return 0.0
    spread = max(float(np.ptp(s)) for s, _ in batches) + 1.0
    gaps = [np.diff(np.unique(c)) for _, c in batches]
    smallest_gap = min((g.min() for g in gaps if g.size), default=1.0)
    high = spread / smallest_gap
    if mean_cost(high) > budget:
        raise ArgumentError(
            f"budget {budget:g} is below the mean cost {mean_cost(high):g} of always choosing the "
            "cheapest model; no λ meets it"
        )
    low = 0.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if mean_cost(middle) > budget else (low, middle)
    return high


def repair(assignment, scores, costs, budget: float, capacity) -> np.ndarray:
    """Makes a per-query assignment feasible without dropping a query (module docstring).

    Queries are in arrival order (row order). Raises `ArgumentError` when `assignment` is not
    `[n]` model indices in [0, M), when the instance itself is infeasible, or when the downgrade
    pass cannot reach the budget.
    """
    problem = check_problem(scores, costs, budget, capacity)
    costs = problem.costs
    n, m = costs.shape
    result = check_assignment(assignment, n, m).copy()
    load = np.zeros(m, np.int64)
    for i in range(n):
        if load[result[i]] >= problem.capacity[result[i]]:
            room = np.flatnonzero(load < problem.capacity)
            result[i] = room[np.argmin(costs[i, room])]
        load[result[i]] += 1
    total = costs[np.arange(n), result].sum()
    for i in reversed(range(n)):
        if total <= problem.budget:
            break
        cheaper = [j for j in np.argsort(costs[i]) if costs[i, j] < costs[i, result[i]] and load[j] < problem.capacity[j]]
        if cheaper:
            j = cheaper[0]
            total += costs[i, j] - costs[i, result[i]]
            load[result[i]] -= 1
            load[j] += 1
            result[i] = j
    if total > problem.budget + 1e-9:
        raise ArgumentError(
            f"repair could not bring the batch cost {total:g} within budget {problem.budget:g} "
            "by downgrading to cheaper models with room"
        )
    return result
