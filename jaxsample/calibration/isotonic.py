"""Isotonic (non-decreasing) regression by pool-adjacent-violators, on the host.

The PAV pass itself is scipy's (`scipy.optimize.isotonic_regression`, C speed: a stream
refits thousands of times); ties are pooled and the piecewise-linear map built here.

CSA maps a raw risk score S to a calibrated risk r = g(S) with g fitted on past rounds only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy

from jaxsample.errors import ArgumentError


class IsotonicFit(NamedTuple):
    """A non-decreasing piecewise-linear map.

    Attributes:
      knots: float64 `[J]` strictly increasing distinct scores seen in the fit.
      values: float64 `[J]` non-decreasing fitted values at the knots.
    """

    knots: np.ndarray
    values: np.ndarray


def isotonic_fit(x, y, weights=None) -> IsotonicFit:
    """Least-squares non-decreasing fit of `y` on `x` (pool-adjacent-violators).

    Args:
      x: `[n]` finite scores, n ≥ 1.
      y: `[n]` finite targets.
      weights: `[n]` positive weights (default 1).

    Returns:
      `IsotonicFit` over the distinct values of `x`; tied scores are pooled first.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.shape != w.shape or x.size == 0:
        raise ArgumentError(f"isotonic_fit needs equal non-empty 1-D x, y, weights; got shapes {x.shape}, {y.shape}, {w.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ArgumentError("isotonic_fit: x and y must be finite (found NaN or inf)")
    if not np.all(w > 0):
        raise ArgumentError(f"isotonic_fit: weights must be > 0, min is {w.min()}")
    order = np.argsort(x, kind="stable")
    knots, first = np.unique(x[order], return_index=True)
    weight = np.add.reduceat(w[order], first)
    mean = np.add.reduceat((w * y)[order], first) / weight
    values = scipy.optimize.isotonic_regression(mean, weights=weight, increasing=True).x
    return IsotonicFit(knots, values)


def isotonic_predict(fit: IsotonicFit, x) -> np.ndarray:
    """Linear interpolation between the knots, constant beyond the ends. Shape of `x`."""
    return np.interp(np.asarray(x, np.float64), fit.knots, fit.values)
