"""Offline instance allocation: how many serving instances of each model under a GPU budget.

A **reconstruction** (spec §3.4): choose n_j ∈ Z≥0 with Σ_j g_j n_j ≤ G to maximise the mean
optimal batch value over validation batches, where model j's capacity is κ_j n_j. The grid
is small for the few models a router serves, so it is enumerated exactly; allocations that
leave some validation batch infeasible score −inf.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from jaxsample.errors import ArgumentError, InfeasibleError
from jaxsample.routing.batch import route_batch


class Allocation(NamedTuple):
    """Attributes:
      instances: int `[M]` instances per model.
      value: mean optimal batch value (Σ â of the routed batch) over the validation batches.
      candidates: allocations evaluated.
    """

    instances: np.ndarray
    value: float
    candidates: int


def batch_value(instances, batches, slots, budget: float) -> float:
    """Mean optimal predicted quality of `batches` with capacity κ_j n_j; −inf if any is infeasible."""
    capacity = np.asarray(slots) * np.asarray(instances)
    values = []
    for scores, costs in batches:
        if capacity.sum() < len(scores):
            return -np.inf
        try:
            assignment = route_batch(scores, costs, budget, capacity)
        except InfeasibleError:  # a malformed batch still raises its ArgumentError
            return -np.inf
        values.append(float(np.asarray(scores)[np.arange(len(scores)), assignment].sum()))
    return float(np.mean(values))


def allocate_instances(batches, gpus_per_instance, slots, total_gpus: int, budget: float) -> Allocation:
    """The allocation with the best mean optimal batch value among all Σ g_j n_j ≤ G.

    Args:
      batches: validation batches `(scores [n, M], costs [n, M])`.
      gpus_per_instance: `[M]` GPUs one instance of model j needs (g_j ≥ 1).
      slots: `[M]` concurrent queries one instance serves (κ_j ≥ 1).
      total_gpus: the GPU budget G.
      budget: per-batch cost budget C_B.
    """
    g = np.asarray(gpus_per_instance, np.int64)
    slots = np.asarray(slots, np.int64)
    if g.ndim != 1 or np.any(g < 1):
        raise ArgumentError(f"gpus_per_instance must be [M] integers ≥ 1, got {g.tolist()}")
    if slots.shape != g.shape or np.any(slots < 1):
        raise ArgumentError(f"slots must be [M] integers ≥ 1, got {slots.tolist()}")
    if total_gpus < 1:
        raise ArgumentError(f"total_gpus must be ≥ 1, got {total_gpus}")
    batches = list(batches)
    best, best_value, count = None, -np.inf, 0
    for instances in itertools.product(*(range(total_gpus // gj + 1) for gj in g)):
        if np.dot(instances, g) > total_gpus:
            continue
        count += 1
        value = batch_value(instances, batches, slots, budget)
        if value > best_value:
            best, best_value = np.asarray(instances), value
    if best is None:
        raise ArgumentError(
            f"no allocation within {total_gpus} GPUs serves every validation batch under budget {budget:g}"
        )
    return Allocation(best, best_value, count)


def uniform_allocation(gpus_per_instance, total_gpus: int) -> np.ndarray:
    """The reference: the same number of instances of every model, as many as fit."""
    g = np.asarray(gpus_per_instance, np.int64)
    return np.full(g.shape, total_gpus // int(g.sum()), np.int64)
