"""Batch routing against brute-force enumeration of every assignment."""

import itertools

import numpy as np
import pytest

from jaxsample.errors import ArgumentError, InfeasibleError
from jaxsample.routing import (
    allocate_instances,
    batch_value,
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
