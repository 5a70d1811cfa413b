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
`InfeasibleError` (an `ArgumentError`) naming the constraint that fails. The budget holds to
a relative 1e-7 at any cost scale, and every solver answer is checked against both limits.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from typing import NamedTuple

import numpy as np
import scipy

from jaxsample.errors import ArgumentError, InfeasibleError
from jaxsample.validation import check_int_array

# Relative to the budget (`_within_budget`), so the budget binds alike at costs of 1e-8 and 1e3.
_FEASIBILITY_TOL = 1e-7
# HiGHS (1.x through scipy) sometimes ends in "Solve error" (status 4) on the knapsack-like
# rows of the robust programs; each retry changes what failed: presolve, then the MIP
# feasibility tolerance (a HiGHS option scipy passes through verbatim).
_HIGHS_RETRIES = ({}, {"presolve": False}, {"mip_feasibility_tolerance": 1e-9}, {"presolve": False, "mip_feasibility_tolerance": 1e-8})


class RoutingProblem(NamedTuple):
    """A validated batch of n queries and M models (`check_problem`).

    Attributes:
      scores: float64 `[n, M]` predicted quality a_ij of model j on query i (finite).
      costs: float64 `[n, M]` cost c_ij ≥ 0 of sending query i to model j.
      budget: float, the limit on the total cost Σ_ij c_ij x_ij.
      capacity: int64 `[M]` most queries model j may take, in [0, n].
    """

    scores: np.ndarray
    costs: np.ndarray
    budget: float
    capacity: np.ndarray


def _within_budget(cost, budget: float):
    """cost ≤ budget up to the relative tolerance (elementwise for an array of costs)."""
    return cost <= budget + _FEASIBILITY_TOL * abs(budget)


def check_scores_costs(scores, costs) -> tuple[np.ndarray, np.ndarray]:
    """float64 `scores` and `costs`, both `[n, M]`, finite, costs ≥ 0; raises `ArgumentError`."""
    scores = np.asarray(scores, np.float64)
    costs = np.asarray(costs, np.float64)
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ArgumentError(f"scores must have shape [n, M] with n, M ≥ 1, got {scores.shape}")
    if costs.shape != scores.shape:
        raise ArgumentError(f"costs must have the shape of scores {scores.shape}, got {costs.shape}")
    for name, values in (("scores", scores), ("costs", costs)):
        if not np.all(np.isfinite(values)):
            raise ArgumentError(f"{name} must be finite; found {values[~np.isfinite(values)][0]}")
    if np.any(costs < 0):
        raise ArgumentError(f"costs must be ≥ 0; found {costs.min()}")
    return scores, costs


def check_assignment(assignment, n: int, m: int) -> np.ndarray:
    """`assignment` as an int array `[n]` of model indices in [0, m); raises `ArgumentError`."""
    values = np.asarray(assignment)
    if values.shape != (n,):
        raise ArgumentError(f"assignment must have shape [n] = ({n},), got {values.shape}")
    check_int_array("assignment", values, 0, m, "the model indices")
    return values


def check_problem(scores, costs, budget, capacity) -> RoutingProblem:
    """Validates a routing instance; raises `ArgumentError` naming what is wrong.

    Infeasibility that can be read off the data is reported here: total capacity below the
    number of queries, or a budget below the cheapest assignment that ignores capacities.
    """
    scores, costs = check_scores_costs(scores, costs)
    capacity = np.asarray(capacity)
    if capacity.shape != (scores.shape[1],):
        raise ArgumentError(f"capacity must have shape [M] = ({scores.shape[1]},), got {capacity.shape}")
    if not np.issubdtype(capacity.dtype, np.integer) and not np.all(np.isfinite(capacity) & (capacity == np.round(capacity))):
        raise ArgumentError(
            f"capacity must hold finite whole numbers of queries (the batch size {scores.shape[0]} for a model "
            f"without a limit), got {capacity.tolist()}"
        )
    if np.any(capacity < 0):
        raise ArgumentError(f"capacity must be ≥ 0 per model, got {capacity.tolist()}")
    if not np.isfinite(budget):
        raise ArgumentError(f"budget must be a finite number, got {budget}")
    n = scores.shape[0]
    # Not a clamp: no model can take more than the n queries, so a larger capacity allows exactly
    # what n does; capping first keeps a "no limit" capacity (1e19) from wrapping in int64.
    capacity = np.minimum(capacity, n).astype(np.int64)
    if capacity.sum() < n:
        raise InfeasibleError(
            f"infeasible: total capacity {int(capacity.sum())} (capacity={capacity.tolist()}) is below "
            f"the {n} queries of the batch; no query is dropped"
        )
    cheapest = costs.min(axis=1).sum()
    if not _within_budget(cheapest, budget):
        raise InfeasibleError(
            f"infeasible: budget {budget:g} is below {cheapest:g}, the cost of sending every query "
            "to its cheapest model"
        )
    return RoutingProblem(scores, costs, float(budget), capacity)


def _assignment_constraints(problem: RoutingProblem, num_extra: int) -> list[scipy.optimize.LinearConstraint]:
    """One model per query, the budget row and the capacity rows over x (row-major [n, M])."""
    n, m = problem.scores.shape
    rows = np.repeat(np.arange(n), m)
    cols = np.arange(n * m)
    one_per_query = scipy.sparse.csr_matrix((np.ones(n * m), (rows, cols)), shape=(n, n * m))
    # HiGHS's feasibility tolerances are absolute: in units of the budget they become relative.
    # `_solve` fixes entries dearer than the budget to 0, so the live coefficients stay in [0, 1].
    scale = problem.budget if problem.budget > 0 else 1.0
    budget_row = scipy.sparse.csr_matrix(problem.costs.reshape(1, -1) / scale)
    per_model = scipy.sparse.csr_matrix((np.ones(n * m), (np.tile(np.arange(m), n), cols)), shape=(m, n * m))
    pad = lambda a: scipy.sparse.hstack([a, scipy.sparse.csr_matrix((a.shape[0], num_extra))]) if num_extra else a  # noqa: E731
    return [
        scipy.optimize.LinearConstraint(pad(one_per_query), 1, 1),
        scipy.optimize.LinearConstraint(pad(budget_row), -np.inf, problem.budget / scale),
        scipy.optimize.LinearConstraint(pad(per_model), 0, problem.capacity),
    ]


def _solve(problem: RoutingProblem, objective: np.ndarray, extra_constraints=(), extra_bounds=None):
    """Maximises `objective · [x, extra]` under the assignment constraints.

    Returns the checked assignment (int `[n]`) and the values of the extra variables.

    Raises `RuntimeError` when HiGHS reports success but its rounded assignment breaks the
    budget or a capacity (HiGHS checks feasibility only up to its own tolerances).
    """
    n, m = problem.scores.shape
    num_extra = objective.size - n * m
    lower = np.zeros(objective.size)
    upper = np.ones(objective.size)
    # costs are ≥ 0, so an entry dearer than the whole budget is never chosen
    upper[: n * m] = _within_budget(problem.costs.ravel(), problem.budget)
    integrality = np.zeros(objective.size)
    integrality[: n * m] = 1
    if num_extra:
        lower[n * m :], upper[n * m :] = extra_bounds
    for options in _HIGHS_RETRIES:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            result = scipy.optimize.milp(
                -objective,
                constraints=[*_assignment_constraints(problem, num_extra), *extra_constraints],
                integrality=integrality,
                bounds=scipy.optimize.Bounds(lower, upper),
                options=options,
            )
        if result.status != 4:
            break
    if result.status == 2:
        raise InfeasibleError(
            f"infeasible: no assignment meets budget {problem.budget:g} and capacity "
            f"{problem.capacity.tolist()} together (each is satisfiable on its own)"
        )
    if not result.success:
        raise RuntimeError(f"HiGHS failed on the routing MILP: {result.message}")
    assignment = np.argmax(result.x[: n * m].reshape(n, m), axis=1)
    cost = problem.costs[np.arange(n), assignment].sum()
    load = np.bincount(assignment, minlength=m)
    if not _within_budget(cost, problem.budget) or np.any(load > problem.capacity):
        raise RuntimeError(
            f"HiGHS returned an assignment that breaks the routing constraints: cost {cost:g} for budget "
            f"{problem.budget:g}, loads {load.tolist()} for capacity {problem.capacity.tolist()}"
        )
    return assignment, result.x[n * m :]


def _indicator(assignment: np.ndarray, m: int) -> np.ndarray:
    """The 0/1 vector x (`[n * M]`) of an assignment."""
    return np.eye(m)[assignment].ravel()


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
    return _solve(problem, problem.scores.ravel())[0]


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
    rows = scipy.sparse.hstack([
        scipy.sparse.csr_matrix((-deviation, diagonal), shape=(k, k)),
        scipy.sparse.csr_matrix((np.ones(k), diagonal), shape=(k, k)),
        scipy.sparse.csr_matrix(np.ones((k, 1))),
    ])
    assignment, _ = _solve(
        problem, objective, [scipy.optimize.LinearConstraint(rows, 0, np.inf)],
        extra_bounds=(np.zeros(k + 1), np.full(k + 1, np.inf)),
    )
    return assignment


class EllipsoidalInfo(NamedTuple):
    """How the ellipsoidal router converged.

    Attributes:
      num_solves: MILPs solved (Kelley: one per cut plus the first; hull: its two ends plus
        one per segment examined).
      gap: upper bound − value of the returned assignment (≤ tol when converged).
      converged: the method proved its answer optimal within `tol`.
    """

    num_solves: int
    gap: float
    converged: bool


def route_ellipsoidal(
    scores, sigma, costs, budget: float, capacity, rho: float, *, method: str = "hull",
    max_solves: int = 200, tol: float = 1e-6,
) -> tuple[np.ndarray, EllipsoidalInfo]:
    """Ellipsoidal-robust router: max âᵀx − ρ‖σ ∘ x‖₂ (diagonal Σ = diag(σ²)).

    HiGHS has no conic constraints; two exact methods replace them:

    - `"kelley"` (the spec's): an epigraph variable s ≥ ‖σ ∘ x‖ imposed by Kelley cuts. At
      the incumbent x* the tangent s ≥ Σ σ² x* x / ‖σ ∘ x*‖ is valid everywhere (Cauchy–
      Schwarz) and exact at x*, so the loop ends at the robust optimum once s* ≥ ‖σ ∘ x*‖ −
      tol. Each cut only bounds assignments that overlap x*, so on tight capacities with
      n = 100 it can need dozens of ever slower MILPs.
    - `"hull"` (default): write each assignment as the point (t, v) = (Σσ²x, âᵀx); the
      robust value v − ρ√t is convex in (t, v), so its maximum over the finite set of
      assignments sits at a vertex of their convex hull, on the chain from the highest v to
      the lowest t. Each vertex maximises a nominal objective (â − λσ²)ᵀx, one plain MILP
      with no extra row. The search (Eisner–Severance) solves at the slope of each open
      hull segment: either nothing lies more than `tol` above the segment, or a new vertex
      splits it. An open segment's points lie in the triangle under the two supporting
      lines of its ends, so the robust value at the triangle's third corner bounds them;
      segments are taken best-first and dropped against the incumbent, which proves the
      optimum within `tol` (given exact MILP solves).
    """
    problem = check_problem(scores, costs, budget, capacity)
    sigma = _check_uncertainty(sigma, problem.scores.shape, "rho", rho)
    fewest = 2 if method == "hull" else 1  # the hull starts from its two ends
    if max_solves < fewest:
        raise ArgumentError(f"max_solves must be ≥ {fewest} for method {method!r}, got {max_solves}")
    if method == "kelley":
        return _ellipsoidal_kelley(problem, sigma.ravel() ** 2, rho, max_solves, tol)
    if method == "hull":
        return _ellipsoidal_hull(problem, sigma.ravel() ** 2, rho, max_solves, tol)
    raise ArgumentError(f"method must be 'hull' or 'kelley', got {method!r}")


def _ellipsoidal_kelley(problem, variance, rho, max_solves, tol):
    m = problem.scores.shape[1]
    objective = np.concatenate([problem.scores.ravel(), [-rho]])
    bounds = ([0.0], [float(np.sqrt(variance.sum()))])
    cuts: list[scipy.optimize.LinearConstraint] = []
    for num_solves in range(1, max_solves + 1):
        assignment, (norm_bound,) = _solve(problem, objective, cuts, extra_bounds=bounds)
        x = _indicator(assignment, m)
        norm = float(np.sqrt(variance @ x))
        gap = rho * (norm - norm_bound)
        if gap <= tol:
            break
        # s − Σ σ² x* x / ‖σ∘x*‖ ≥ 0 (the incumbent has norm > s ≥ 0 here)
        cuts.append(scipy.optimize.LinearConstraint(np.concatenate([-variance * x / norm, [1.0]])[None], 0, np.inf))
    return assignment, EllipsoidalInfo(num_solves, max(float(gap), 0.0), gap <= tol)


class _HullPoint(NamedTuple):
    """A solved assignment as a point (t = Σσ²x, v = âᵀx) with the slope λ of the
    supporting line v − λt ≤ v_p − λt_p it maximised (λ = inf: the least t)."""

    t: float
    value: float
    assignment: np.ndarray
    slope: float


def _ellipsoidal_hull(problem, variance, rho, max_solves, tol):
    m = problem.scores.shape[1]
    scores = problem.scores.ravel()

    def solve(slope):
        objective = -variance if slope == np.inf else scores - slope * variance
        assignment, _ = _solve(problem, objective)
        x = _indicator(assignment, m)
        return _HullPoint(float(variance @ x), float(scores @ x), assignment, slope)

    def robust_value(t, value):
        return value - rho * np.sqrt(max(t, 0.0))

    def corner_bound(high, low):
        # the triangle above segment high–low and under both supporting lines; the convex
        # robust value peaks at one of its vertices, and the endpoints are already scored
        if low.slope == np.inf:
            t = low.t
        else:
            t = (low.value - high.value + high.slope * high.t - low.slope * low.t) / (high.slope - low.slope)
            t = min(max(t, low.t), high.t)  # the corner lies between the ends; rounding may not
        return robust_value(t, high.value + high.slope * (t - high.t))

    top, bottom = solve(0.0), solve(np.inf)
    solves = 2
    best = max((top, bottom), key=lambda p: robust_value(p.t, p.value))
    best_value = robust_value(best.t, best.value)
    pending = []  # (−bound, order, high-t end, low-t end) of the hull segments still open
    order = itertools.count()

    def open_segment(high, low):
        if high.t > low.t and high.value > low.value:  # otherwise high is dominated by low
            heapq.heappush(pending, (-corner_bound(high, low), next(order), high, low))

    open_segment(top, bottom)
    closed_slack = 0.0  # a closed segment's points beat its better end by at most its height
    while pending and -pending[0][0] > best_value + tol and solves < max_solves:
        _, _, high, low = heapq.heappop(pending)
        slope = (high.value - low.value) / (high.t - low.t)
        point = solve(slope)
        solves += 1
        height = point.value - slope * point.t - (high.value - slope * high.t)
        if height <= tol:  # nothing lies more than `height` above the segment
            closed_slack = max(closed_slack, height)
            continue
        if robust_value(point.t, point.value) > best_value:
            best, best_value = point, robust_value(point.t, point.value)
        open_segment(high, point)
        open_segment(point, low)
    gap = max([closed_slack] + [-bound - best_value for bound, *_ in pending])
    return best.assignment, EllipsoidalInfo(solves, float(gap), bool(gap <= tol))


def worst_case_value(assignment, scores, sigma, *, kind: str, radius: float, kappa: float = 1.0) -> float:
    """The assignment's quality under the worst perturbation of the named uncertainty set.

    kind: "box" (|ξ| ≤ radius·σ), "budgeted" (at most Γ = radius coefficients fall by κσ,
    a fractional last one allowed) or "ellipsoidal" (‖ξ / σ‖₂ ≤ radius).
    """
    scores = np.asarray(scores, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if scores.ndim != 2 or sigma.shape != scores.shape:
        raise ArgumentError(f"scores and sigma must both have shape [n, m], got {scores.shape} and {sigma.shape}")
    chosen = np.arange(scores.shape[0]), check_assignment(assignment, *scores.shape)
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
      feasible: both violations are 0 (the budget's up to a relative 1e-7).
    """

    quality: float
    cost: float
    budget_violation: float
    capacity_violation: int
    feasible: bool


def evaluate(assignment, true_quality, costs, budget: float | None = None, capacity=None) -> Evaluation:
    """Realised mean quality and cost of `assignment`, with its budget and capacity overflow."""
    true_quality = np.asarray(true_quality, np.float64)
    costs = np.asarray(costs, np.float64)
    n, m = true_quality.shape
    assignment = check_assignment(assignment, n, m)
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
        feasible=(budget is None or bool(_within_budget(cost, budget))) and over_capacity == 0,
    )
