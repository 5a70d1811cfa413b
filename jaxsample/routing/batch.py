"""Batch-level query routing as an exact MILP, with robust counterparts.

Markovic-Voronov et al., "Robust Batch-Level Query Routing for Large Language Models under
Cost and Capacity Constraints" (arXiv 2603.26796). No code is public: the nominal program
follows the paper's abstract; the robust counterparts (box, budgeted, ellipsoidal) are a
**reconstruction** with standard robust optimisation (Ben-Tal & Nemirovski; Bertsimas & Sim
2004), as in ../shared/specs/steering_safety_routing.md §3.

Every router assigns each of n queries exactly one of M models:

    max Σ_ij a_ij x_ij   s.t.  Σ_j x_ij = 1 ∀i,  Σ_ij c_ij x_ij ≤ budget,  Σ_i x_ij ≤ capacity_j ∀j,

with x binary, solved by HiGHS through `scipy.optimize.milp`. An assignment is an int
array `[n]` of model indices; no query is ever dropped, and an infeasible instance raises
`ArgumentError` naming the constraint that fails.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix, hstack

from jaxsample.errors import ArgumentError

_FEASIBILITY_TOL = 1e-7


class RoutingProblem(NamedTuple):
    """A validated batch: predicted quality, costs `[n, M]`, budget, capacity `[M]`."""

    scores: np.ndarray
    costs: np.ndarray
    budget: float
    capacity: np.ndarray


def check_problem(scores, costs, budget, capacity) -> RoutingProblem:
    """Validates a routing instance; raises `ArgumentError` naming what is wrong.

    Infeasibility that can be read off the data is reported here: total capacity below the
    number of queries, or a budget below the cheapest assignment that ignores capacities.
    """
    scores = np.asarray(scores, np.float64)
    costs = np.asarray(costs, np.float64)
    capacity = np.asarray(capacity)
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ArgumentError(f"scores must have shape [n, M] with n, M ≥ 1, got {scores.shape}")
    if costs.shape != scores.shape:
        raise ArgumentError(f"costs must have the shape of scores {scores.shape}, got {costs.shape}")
    if capacity.shape != (scores.shape[1],):
        raise ArgumentError(f"capacity must have shape [M] = ({scores.shape[1]},), got {capacity.shape}")
    if not np.issubdtype(capacity.dtype, np.integer) and not np.all(capacity == np.round(capacity)):
        raise ArgumentError(f"capacity must hold whole numbers of queries, got {capacity.tolist()}")
    for name, values in (("scores", scores), ("costs", costs)):
        if not np.all(np.isfinite(values)):
            raise ArgumentError(f"{name} must be finite; found {values[~np.isfinite(values)][0]}")
    if np.any(costs < 0):
        raise ArgumentError(f"costs must be ≥ 0; found {costs.min()}")
    if np.any(capacity < 0):
        raise ArgumentError(f"capacity must be ≥ 0 per model, got {capacity.tolist()}")
    if not np.isfinite(budget):
        raise ArgumentError(f"budget must be a finite number, got {budget}")
    n = scores.shape[0]
    if capacity.sum() < n:
        raise ArgumentError(
            f"infeasible: total capacity {int(capacity.sum())} (capacity={capacity.tolist()}) is below "
            f"the {n} queries of the batch; no query is dropped"
        )
    cheapest = costs.min(axis=1).sum()
    if budget < cheapest - _FEASIBILITY_TOL:
        raise ArgumentError(
            f"infeasible: budget {budget:g} is below {cheapest:g}, the cost of sending every query "
            "to its cheapest model"
        )
    return RoutingProblem(scores, costs, float(budget), capacity.astype(np.int64))


def _assignment_constraints(problem: RoutingProblem, num_extra: int) -> list[LinearConstraint]:
    """One model per query, the budget row and the capacity rows over x (row-major [n, M])."""
    n, m = problem.scores.shape
    rows = np.repeat(np.arange(n), m)
    cols = np.arange(n * m)
    one_per_query = csr_matrix((np.ones(n * m), (rows, cols)), shape=(n, n * m))
    budget_row = csr_matrix(problem.costs.reshape(1, -1))
    per_model = csr_matrix((np.ones(n * m), (np.tile(np.arange(m), n), cols)), shape=(m, n * m))
    pad = lambda a: hstack([a, csr_matrix((a.shape[0], num_extra))]) if num_extra else a  # noqa: E731
    return [
        LinearConstraint(pad(one_per_query), 1, 1),
        LinearConstraint(pad(budget_row), -np.inf, problem.budget),
        LinearConstraint(pad(per_model), 0, problem.capacity),
    ]


def _solve(problem: RoutingProblem, objective: np.ndarray, extra_constraints=(), extra_bounds=None):
    """Maximises `objective · [x, extra]` under the assignment constraints; returns the solution."""
    n, m = problem.scores.shape
    num_extra = objective.size - n * m
    lower = np.zeros(objective.size)
    upper = np.ones(objective.size)
    integrality = np.zeros(objective.size)
    integrality[: n * m] = 1
    if num_extra:
        lower[n * m :], upper[n * m :] = extra_bounds
    result = milp(
        -objective,
        constraints=[*_assignment_constraints(problem, num_extra), *extra_constraints],
        integrality=integrality,
        bounds=Bounds(lower, upper),
    )
    if result.status == 2:
        raise ArgumentError(
            f"infeasible: no assignment meets budget {problem.budget:g} and capacity "
            f"{problem.capacity.tolist()} together (each is satisfiable on its own)"
        )
    if not result.success:
        raise RuntimeError(f"HiGHS failed on the routing MILP: {result.message}")
    return result.x


def _to_assignment(solution: np.ndarray, n: int, m: int) -> np.ndarray:
    return np.argmax(solution[: n * m].reshape(n, m), axis=1)


def route_batch(scores, costs, budget: float, capacity) -> np.ndarray:
    """The nominal batch router: the exact MILP of the module docstring.

    Args:
      scores: `[n, M]` predicted quality â_ij.
      costs: `[n, M]` cost c_ij ≥ 0.
      budget: the batch budget C_B.
      capacity: `[M]` queries each model may take.

    Returns:
      int `[n]`, the model of each query.
    """
    problem = check_problem(scores, costs, budget, capacity)
    n, m = problem.scores.shape
    return _to_assignment(_solve(problem, problem.scores.ravel()), n, m)


def _check_uncertainty(sigma, shape, name: str, radius: float) -> np.ndarray:
    sigma = np.asarray(sigma, np.float64)
    if sigma.shape != shape:
        raise ArgumentError(f"sigma must have the shape of scores {shape}, got {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ArgumentError("sigma must be finite and ≥ 0")
    if not np.isfinite(radius) or radius < 0:
        raise ArgumentError(f"{name} must be a finite number ≥ 0, got {radius}")
    return sigma


def route_box(scores, sigma, costs, budget: float, capacity, kappa: float) -> np.ndarray:
    """Box-robust router (|ξ_ij| ≤ κσ_ij): the nominal MILP on the lower bounds â − κσ.

    A per-query-constant σ shifts every feasible objective by the same constant (each query
    takes exactly one model), so then the box solution is the nominal one.
    """
    scores = np.asarray(scores, np.float64)
    sigma = _check_uncertainty(sigma, scores.shape, "kappa", kappa)
    return route_batch(scores - kappa * sigma, costs, budget, capacity)


def route_budgeted(scores, sigma, costs, budget: float, capacity, gamma: float, kappa: float = 1.0) -> np.ndarray:
    """Budgeted-uncertainty router (Bertsimas–Sim): at most Γ coefficients fall by κσ_ij.

    max Σ â x − Γ z − Σ p  s.t.  p_ij + z ≥ κ σ_ij x_ij,  z, p ≥ 0 — the dual of the inner
    worst case, so the whole problem stays one MILP.
    """
    problem = check_problem(scores, costs, budget, capacity)
    sigma = _check_uncertainty(sigma, problem.scores.shape, "kappa", kappa)
    if not np.isfinite(gamma) or gamma < 0:
        raise ArgumentError(f"gamma must be a finite number ≥ 0, got {gamma}")
    n, m = problem.scores.shape
    k = n * m
    # variables: x [k], p [k], z [1]
    objective = np.concatenate([problem.scores.ravel(), -np.ones(k), [-gamma]])
    deviation = np.asarray(kappa * sigma.ravel())
    # p_ij + z − κσ_ij x_ij ≥ 0
    diagonal = (np.arange(k), np.arange(k))
    rows = hstack([
        csr_matrix((-deviation, diagonal), shape=(k, k)),
        csr_matrix((np.ones(k), diagonal), shape=(k, k)),
        csr_matrix(np.ones((k, 1))),
    ])
    solution = _solve(
        problem, objective, [LinearConstraint(rows, 0, np.inf)],
        extra_bounds=(np.zeros(k + 1), np.full(k + 1, np.inf)),
    )
    return _to_assignment(solution, n, m)


class EllipsoidalInfo(NamedTuple):
    """Convergence of the Kelley cutting-plane loop.

    Attributes:
      num_cuts: cuts added before the incumbent's epigraph variable met its norm.
      gap: s* − ‖σ ∘ x*‖ at the end (≥ −tol when converged).
      converged: the loop met the tolerance within `max_cuts`.
    """

    num_cuts: int
    gap: float
    converged: bool


def route_ellipsoidal(
    scores, sigma, costs, budget: float, capacity, rho: float, *, max_cuts: int = 200, tol: float = 1e-6
) -> tuple[np.ndarray, EllipsoidalInfo]:
    """Ellipsoidal-robust router: max âᵀx − ρ‖σ ∘ x‖₂ (diagonal Σ = diag(σ²)).

    HiGHS has no conic constraints, so s ≥ ‖σ ∘ x‖ is imposed by Kelley cuts: at the
    incumbent x*, the tangent s ≥ Σ σ² x* x / ‖σ ∘ x*‖ (valid everywhere by convexity),
    re-solved until s* ≥ ‖σ ∘ x*‖ − tol. Binary x makes ‖σ ∘ x‖ = sqrt(Σ σ² x), so every
    assignment's norm is exact at its own cut and the loop ends at the robust optimum.
    """
    problem = check_problem(scores, costs, budget, capacity)
    sigma = _check_uncertainty(sigma, problem.scores.shape, "rho", rho)
    if max_cuts < 1:
        raise ArgumentError(f"max_cuts must be ≥ 1, got {max_cuts}")
    n, m = problem.scores.shape
    variance = sigma.ravel() ** 2
    objective = np.concatenate([problem.scores.ravel(), [-rho]])
    bound = float(np.sqrt(variance.sum()))
    cuts: list[LinearConstraint] = []
    incumbent = _solve(problem, objective, extra_bounds=([0.0], [bound]))
    for num_cuts in range(max_cuts + 1):
        x = incumbent[: n * m]
        norm = float(np.sqrt(variance @ x))
        gap = incumbent[-1] - norm
        if rho == 0 or gap >= -tol:
            return _to_assignment(incumbent, n, m), EllipsoidalInfo(num_cuts, float(gap), True)
        if num_cuts == max_cuts:
            break
        # s − Σ σ² x* x / ‖σ∘x*‖ ≥ 0 (at x* = 0 the norm is 0 and s ≥ 0 already holds)
        gradient = variance * x / max(norm, 1e-12)
        cuts.append(LinearConstraint(np.concatenate([-gradient, [1.0]])[None], 0, np.inf))
        incumbent = _solve(problem, objective, cuts, extra_bounds=([0.0], [bound]))
    return _to_assignment(incumbent, n, m), EllipsoidalInfo(max_cuts, float(gap), False)


def worst_case_value(assignment, scores, sigma, *, kind: str, radius: float, kappa: float = 1.0) -> float:
    """The assignment's quality under the worst perturbation of the named uncertainty set.

    kind: "box" (|ξ| ≤ radius·σ), "budgeted" (at most Γ = radius coefficients fall by κσ,
    a fractional last one allowed) or "ellipsoidal" (‖ξ / σ‖₂ ≤ radius).
    """
    scores = np.asarray(scores, np.float64)
    sigma = np.asarray(sigma, np.float64)
    chosen = np.arange(scores.shape[0]), np.asarray(assignment)
    nominal = float(scores[chosen].sum())
    deviations = sigma[chosen]
    if kind == "box":
        return nominal - radius * float(deviations.sum())
    if kind == "budgeted":
        ordered = np.sort(kappa * deviations)[::-1]
        whole = int(np.floor(radius))
        loss = ordered[:whole].sum() + (radius - whole) * (ordered[whole] if whole < ordered.size else 0.0)
        return nominal - float(loss)
    if kind == "ellipsoidal":
        return nominal - radius * float(np.sqrt((deviations**2).sum()))
    raise ArgumentError(f"kind must be 'box', 'budgeted' or 'ellipsoidal', got {kind!r}")


class Evaluation(NamedTuple):
    """Realised outcome of an assignment.

    Attributes:
      quality: mean true quality of the chosen models.
      cost: total cost of the batch.
      budget_violation: cost above the budget (0 when within).
      capacity_violation: queries above capacity, summed over models.
      feasible: both violations are 0.
    """

    quality: float
    cost: float
    budget_violation: float
    capacity_violation: int
    feasible: bool


def evaluate(assignment, true_quality, costs, budget: float | None = None, capacity=None) -> Evaluation:
    """Realised mean quality and cost of `assignment`, with its budget and capacity overflow."""
    assignment = np.asarray(assignment)
    true_quality = np.asarray(true_quality, np.float64)
    costs = np.asarray(costs, np.float64)
    n, m = true_quality.shape
    if assignment.shape != (n,) or assignment.min() < 0 or assignment.max() >= m:
        raise ArgumentError(f"assignment must be [n] = ({n},) model indices in [0, {m}), got {assignment!r}")
    rows = np.arange(n)
    cost = float(costs[rows, assignment].sum())
    over_budget = 0.0 if budget is None else max(0.0, cost - budget)
    load = np.bincount(assignment, minlength=m)
    over_capacity = 0 if capacity is None else int(np.maximum(load - np.asarray(capacity), 0).sum())
    return Evaluation(
        quality=float(true_quality[rows, assignment].mean()),
        cost=cost,
        budget_violation=over_budget,
        capacity_violation=over_capacity,
        feasible=over_budget <= _FEASIBILITY_TOL * max(1.0, abs(budget or 0)) and over_capacity == 0,
    )
