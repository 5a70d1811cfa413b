"""Batch-level query routing under cost and capacity constraints (nominal and robust MILPs),
the per-query baseline with its repair, and offline instance allocation."""

from jaxsample.routing.allocate import Allocation, allocate_instances, batch_value, uniform_allocation
from jaxsample.routing.baselines import per_query_route, repair, tune_lambda
from jaxsample.routing.batch import (
    EllipsoidalInfo,
    Evaluation,
    RoutingProblem,
    check_problem,
    evaluate,
    route_batch,
    route_box,
    route_budgeted,
    route_ellipsoidal,
    worst_case_value,
)

__all__ = [
    "Allocation",
    "EllipsoidalInfo",
    "Evaluation",
    "RoutingProblem",
    "allocate_instances",
    "batch_value",
    "check_problem",
    "evaluate",
    "per_query_route",
    "repair",
    "route_batch",
    "route_box",
    "route_budgeted",
    "route_ellipsoidal",
    "tune_lambda",
    "uniform_allocation",
    "worst_case_value",
]
