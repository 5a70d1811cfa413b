"""Batch routing against brute-force enumeration of every assignment."""

import itertools

import numpy as np
import pytest
import scipy

from jaxsample.errors import ArgumentError, InfeasibleError
from jaxsample.routing import (
    allocate_instances,
    batch_value,
    check_problem,
    evaluate,
    per_query_route,
    repair,
    route_batch,
    route_box,
    route_budgeted,
    route_ellipsoidal,
    tune_lambda,
    uniform_allocation,
    worst_case_value,
)


def random_instance(rng, n=6, m=3, tightness=0.5):
    scores = rng.uniform(0, 1, (n, m))
    costs = rng.uniform(0.5, 5, (n, m))
    capacity = rng.integers(1, n, m)
    capacity[rng.integers(m)] += max(0, n - capacity.sum())
    dearest = costs.max(1).sum()  # every capacity-feasible assignment costs at most this
    cheapest = total(costs, route_batch(-costs, costs, dearest, capacity))
    budget = cheapest + tightness * (dearest - cheapest)
    return scores, costs, budget, capacity


def feasible_assignments(costs, budget, capacity):
    n, m = costs.shape
    for assignment in itertools.product(range(m), repeat=n):
        a = np.asarray(assignment)
        if costs[np.arange(n), a].sum() <= budget + 1e-9 and np.all(np.bincount(a, minlength=m) <= capacity):
            yield a


def brute_force(value_fn, costs, budget, capacity):
    return max((value_fn(a), tuple(a)) for a in feasible_assignments(costs, budget, capacity))


def total(scores, a):
    return float(scores[np.arange(len(a)), a].sum())


@pytest.mark.parametrize("seed", range(8))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores, costs, budget, capacity = random_instance(rng, tightness=rng.uniform(0.1, 0.9))
    best, _ = brute_force(lambda a: total(scores, a), costs, budget, capacity)
    a = route_batch(scores, costs, budget, capacity)
    result = evaluate(a, scores, costs, budget, capacity)
    assert result.feasible
    assert total(scores, a) == pytest.approx(best, abs=1e-7)


def test_constraints_never_violated_over_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = rng.integers(5, 20), rng.integers(2, 5)
        scores, costs, budget, capacity = random_instance(rng, n, m, tightness=rng.uniform(0.05, 1.0))
        sigma = rng.uniform(0, 0.3, (n, m))
        for a in (
            route_batch(scores, costs, budget, capacity),
            route_box(scores, sigma, costs, budget, capacity, kappa=1.0),
            route_budgeted(scores, sigma, costs, budget, capacity, gamma=3.0),
            route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=1.0)[0],
        ):
            assert a.shape == (n,)
            assert evaluate(a, scores, costs, budget, capacity).feasible


def test_box_equals_nominal_under_per_query_constant_sigma():
    rng = np.random.default_rng(1)
    for _ in range(10):
        scores, costs, budget, capacity = random_instance(rng, n=12, m=4)
        sigma = np.repeat(rng.uniform(0, 0.5, (12, 1)), 4, axis=1)
        nominal = route_batch(scores, costs, budget, capacity)
        robust = route_box(scores, sigma, costs, budget, capacity, kappa=2.0)
        assert total(scores, robust) == pytest.approx(total(scores, nominal), abs=1e-7)


@pytest.mark.parametrize("method", ["hull", "kelley"])
@pytest.mark.parametrize("seed", range(5))
def test_ellipsoidal_reaches_brute_force_robust_optimum(seed, method):
    rng = np.random.default_rng(10 + seed)
    scores, costs, budget, capacity = random_instance(rng)
    sigma = rng.uniform(0, 0.4, scores.shape)
    rho = 1.5
    best, _ = brute_force(
        lambda a: worst_case_value(a, scores, sigma, kind="ellipsoidal", radius=rho), costs, budget, capacity
    )
    a, info = route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=rho, method=method)
    assert info.converged and info.gap <= 1e-6
    assert worst_case_value(a, scores, sigma, kind="ellipsoidal", radius=rho) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_ellipsoidal_hull_gap_bounds_the_shortfall_when_stopped_early(seed):
    rng = np.random.default_rng(30 + seed)
    scores, costs, budget, capacity = random_instance(rng, n=7, m=3)
    sigma = rng.uniform(0, 0.6, scores.shape)
    rho = 2.0
    value = lambda a: worst_case_value(a, scores, sigma, kind="ellipsoidal", radius=rho)  # noqa: E731
    best, _ = brute_force(value, costs, budget, capacity)
    stopped_early = 0
    for max_solves in range(2, 8):
        a, info = route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=rho, max_solves=max_solves)
        assert info.num_solves <= max_solves
        assert best - value(a) <= info.gap + 1e-9
        stopped_early += not info.converged
    assert info.converged and best - value(a) <= 1e-6
    assert stopped_early > 0  # the bound was exercised, not only the converged case


@pytest.mark.parametrize("seed", range(5))
def test_budgeted_milp_equals_brute_force_worst_case(seed):
    rng = np.random.default_rng(20 + seed)
    scores, costs, budget, capacity = random_instance(rng)
    sigma = rng.uniform(0, 0.4, scores.shape)
    gamma = 2.5
    best, _ = brute_force(
        lambda a: worst_case_value(a, scores, sigma, kind="budgeted", radius=gamma), costs, budget, capacity
    )
    a = route_budgeted(scores, sigma, costs, budget, capacity, gamma=gamma)
    assert worst_case_value(a, scores, sigma, kind="budgeted", radius=gamma) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("kind, radius, kappa, expected", [
    ("box", 0.5, 1.0, 4.0 - 0.5 * 1.0),
    ("budgeted", 2.5, 1.0, 4.0 - (0.4 + 0.3 + 0.5 * 0.2)),  # the two largest whole, half the third
    ("budgeted", 2.0, 2.0, 4.0 - 2.0 * (0.4 + 0.3)),
    ("budgeted", 6.0, 1.0, 4.0 - 1.0),  # Γ beyond n: every deviation
    ("ellipsoidal", 2.0, 1.0, 4.0 - 2.0 * np.sqrt(0.3)),
])
def test_worst_case_value_matches_hand_values(kind, radius, kappa, expected):
    # Each query's chosen model has score 1; the other model's larger σ must be ignored.
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    sigma = np.array([[0.4, 9.0], [9.0, 0.3], [0.2, 9.0], [9.0, 0.1]])
    value = worst_case_value([0, 1, 0, 1], scores, sigma, kind=kind, radius=radius, kappa=kappa)
    assert value == pytest.approx(expected, abs=1e-12)


def test_robust_worst_case_at_least_nominal_worst_case():
    rng = np.random.default_rng(2)
    for _ in range(6):
        scores, costs, budget, capacity = random_instance(rng, n=10, m=3)
        sigma = rng.uniform(0, 0.5, scores.shape)
        nominal = route_batch(scores, costs, budget, capacity)
        robust = {
            "box": route_box(scores, sigma, costs, budget, capacity, kappa=1.0),
            "budgeted": route_budgeted(scores, sigma, costs, budget, capacity, gamma=4.0),
            "ellipsoidal": route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=1.0)[0],
        }
        radius = {"box": 1.0, "budgeted": 4.0, "ellipsoidal": 1.0}
        for kind, a in robust.items():
            assert worst_case_value(a, scores, sigma, kind=kind, radius=radius[kind]) >= worst_case_value(
                nominal, scores, sigma, kind=kind, radius=radius[kind]
            ) - 1e-7


def test_infeasible_instances_name_the_failing_constraint():
    scores = np.ones((4, 2))
    costs = np.array([[1.0, 3.0]] * 4)
    with pytest.raises(InfeasibleError, match="total capacity 3"):
        route_batch(scores, costs, 100, [2, 1])
    with pytest.raises(InfeasibleError, match="budget 3 is below 4"):
        route_batch(scores, costs, 3, [4, 4])
    with pytest.raises(InfeasibleError, match="budget 5 and capacity \\[1, 4\\] together"):
        route_batch(scores, costs, 5, [1, 4])


def tiny_cost_instance(budget):
    """Four queries at costs of 1e-8 and 2e-8 (dollars per query at small prices)."""
    return np.tile([0.2, 0.9], (4, 1)), np.tile([1e-8, 2e-8], (4, 1)), budget, [4, 4]


def test_budget_binds_at_tiny_costs_on_every_router():
    # Half the cheapest total: the old absolute 1e-7 pre-check let it through, to 4× over budget.
    with pytest.raises(InfeasibleError, match="budget 2e-08 is below 4e-08"):
        route_batch(*tiny_cost_instance(2e-8))
    scores, costs, budget, capacity = tiny_cost_instance(6e-8)  # room for exactly 2 upgrades
    sigma = np.full(scores.shape, 0.1)
    routers = {
        "nominal": lambda: route_batch(scores, costs, budget, capacity),
        "box": lambda: route_box(scores, sigma, costs, budget, capacity, kappa=1.0),
        "budgeted": lambda: route_budgeted(scores, sigma, costs, budget, capacity, gamma=2.0),
        "hull": lambda: route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=1.0)[0],
        # symmetric rows make Kelley slow to prove optimality; every incumbent must still fit
        "kelley": lambda: route_ellipsoidal(scores, sigma, costs, budget, capacity, rho=1.0, method="kelley", max_solves=4)[0],
    }
    for name, route in routers.items():
        a = route()
        assert int(a.sum()) == 2, f"{name} upgraded {int(a.sum())} queries; the budget allows 2"
        assert evaluate(a, scores, costs, budget, capacity).feasible
    # 1e-9 (1.7%) over a budget of 6e-8 is infeasible, though below the old absolute tolerance 1e-7
    assert not evaluate([1, 1, 0, 0], scores, costs, 5.9e-8, capacity).feasible


def test_solver_answer_breaking_the_budget_is_an_error(monkeypatch):
    scores, costs, budget, capacity = tiny_cost_instance(6e-8)
    over_budget = scipy.optimize.OptimizeResult(status=0, success=True, message="", x=np.tile([0.0, 1.0], 4))
    monkeypatch.setattr(scipy.optimize, "milp", lambda *args, **kwargs: over_budget)
    with pytest.raises(RuntimeError, match="breaks the routing constraints: cost 8e-08 for budget 6e-08"):
        route_batch(scores, costs, budget, capacity)


@pytest.mark.parametrize("no_limit", [1e19, 1e20, np.iinfo(np.int64).max])
def test_capacity_beyond_int64_means_no_limit(no_limit):
    scores, costs = np.array([[0.1, 0.9]] * 4), np.array([[1.0, 2.0]] * 4)
    np.testing.assert_array_equal(check_problem(scores, costs, 100.0, [4, no_limit]).capacity, [4, 4])
    np.testing.assert_array_equal(route_batch(scores, costs, 100.0, [4, no_limit]), [1, 1, 1, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=np.ones((3,))), "scores must have shape"),
        (dict(costs=np.ones((3, 3))), "costs must have the shape"),
        (dict(capacity=[3]), "capacity must have shape"),
        (dict(costs=-np.ones((3, 2))), "costs must be ≥ 0"),
        (dict(scores=np.full((3, 2), np.nan)), "scores must be finite"),
        (dict(capacity=[1.5, 3]), "whole numbers"),
        (dict(capacity=[np.inf, 3]), "finite whole numbers .* batch size 3"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(scores=np.ones((3, 2)), costs=np.ones((3, 2)), budget=10.0, capacity=[3, 3])
    args.update(kwargs)
    with pytest.raises(ArgumentError, match=match):
        route_batch(**args)


def test_per_query_rule_tuning_and_repair():
    rng = np.random.default_rng(3)
    batches = [random_instance(rng, n=20, m=4)[:2] for _ in range(10)]
    budget = 50.0
    lam = tune_lambda(batches, budget)
    mean_cost = np.mean([c[np.arange(20), per_query_route(s, c, lam)].sum() for s, c in batches])
    assert mean_cost <= budget + 1e-9
    assert np.mean([c[np.arange(20), per_query_route(s, c, lam * 0.9)].sum() for s, c in batches]) > budget
    capacity = np.array([3, 5, 6, 8])
    for scores, costs in batches:
        raw = per_query_route(scores, costs, lam)
        fixed = repair(raw, scores, costs, budget, capacity)
        assert evaluate(fixed, scores, costs, budget, capacity).feasible
        best = route_batch(scores, costs, budget, capacity)
        assert total(scores, best) >= total(scores, fixed) - 1e-9


@pytest.mark.parametrize(
    "assignment, match",
    [
        ([-1, -1, 0, 0], r"assignment holds -1 at index \(0,\), outside the model indices \[0, 2\)"),
        ([0, 2, 0, 0], r"assignment holds 2 at index \(1,\), outside the model indices \[0, 2\)"),
        ([0, 1], r"assignment must have shape \[n\] = \(4,\), got \(2,\)"),
        ([0.0, 1.0, 0.0, 1.0], "assignment must hold integers, got dtype float64"),
    ],
)
def test_repair_rejects_a_malformed_assignment(assignment, match):
    scores, costs = np.array([[0.1, 0.9]] * 4), np.array([[1.0, 2.0]] * 4)
    with pytest.raises(ArgumentError, match=match):
        repair(assignment, scores, costs, 8.0, [4, 4])


def test_worst_case_value_rejects_a_malformed_assignment_or_sigma():
    scores = np.array([[0.1, 0.9]] * 4)
    with pytest.raises(ArgumentError, match=r"assignment holds 2 at index \(2,\), outside the model indices \[0, 2\)"):
        worst_case_value([0, 1, 2, 0], scores, scores, kind="box", radius=1.0)  # model 2 read as model 1 before
    with pytest.raises(ArgumentError, match="scores and sigma must both have shape"):
        worst_case_value([0, 1, 1, 0], scores, scores[:, :1], kind="box", radius=1.0)


@pytest.mark.parametrize("bad", ["scores", "costs"])
def test_per_query_route_rejects_a_nan(bad):
    args = {"scores": np.array([[0.1, 0.5]]), "costs": np.array([[1.0, 2.0]])}
    args[bad][0, 0] = np.nan  # a NaN utility is never the max: the query fell to model 0 silently
    with pytest.raises(ArgumentError, match=f"{bad} must be finite; found nan"):
        per_query_route(args["scores"], args["costs"], 0.0)


def test_instance_allocation_beats_or_ties_uniform_and_respects_gpus():
    rng = np.random.default_rng(4)
    batches = [random_instance(rng, n=12, m=3)[:2] for _ in range(3)]
    g, slots, gpus, budget = np.array([1, 1, 2]), np.array([3, 3, 3]), 6, 30.0
    allocation = allocate_instances(batches, g, slots, gpus, budget)
    assert allocation.instances @ g <= gpus
    assert allocation.value >= batch_value(uniform_allocation(g, gpus), batches, slots, budget)
    assert allocation.value == pytest.approx(
        max(
            batch_value(n, batches, slots, budget)
            for n in itertools.product(range(7), range(7), range(4))
            if np.dot(n, g) <= gpus
        )
    )
    # Infeasible allocations score −inf; a malformed batch is an error, not an infeasible one.
    with pytest.raises(ArgumentError, match="scores must be finite"):
        allocate_instances([(np.full((12, 3), np.nan), batches[0][1])], g, slots, gpus, budget)
