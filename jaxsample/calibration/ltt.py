"""Learn-then-Test pieces: binomial p-values and fixed-sequence testing.

Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test" [standard]. Both the LTT
baseline of CSA and ORCA's stopping-threshold calibration use these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_real

Array = jax.Array


def binomial_p_value(num_losses, num_trials, level) -> Array:
    """p = P(Bin(n, level) ≤ s): small when s losses in n trials are too few for a risk > level.

    The p-value of H: risk > level for binary losses (exact binomial tail, via the regularised
    incomplete beta function). n = 0 gives 1 (no evidence). Concrete arguments are checked;
    traced ones (inside jit) are not.

    The tail is computed on the host in float64 and rounded up to float32, so it is never below
    the exact value: float32's betainc underestimates it by ~2% at n = 20000 (cancelling
    log-gamma terms), and an underestimated p-value breaks LTT's error guarantee. Under jit the
    traced arguments reach the host through `jax.pure_callback` as float32 (counts exact up to
    2²⁴); concrete ones stay float64.

    Args:
      num_losses: s ≥ 0, number of losses (int or float array).
      num_trials: n ≥ s, same shape (broadcasts).
      level: the risk level under test, in (0, 1).

    Returns:
      float32 p-values, the broadcast shape of the arguments.
    """
    check_real("level", level, "(0, 1)")
    check_real("num_losses", num_losses, "[0, inf)")
    check_real("num_trials", num_trials, "[0, inf)")
    if not any(isinstance(x, jax.core.Tracer) for x in (num_losses, num_trials)):
        losses, trials = np.broadcast_arrays(np.asarray(num_losses, np.float64), np.asarray(num_trials, np.float64))
        excess = losses > trials
        if excess.any():
            where = tuple(int(i) for i in np.argwhere(excess)[0]) if excess.ndim else ()
            element = f" (element {where})" if where else ""
            raise ArgumentError(
                f"num_losses must be ≤ num_trials, got {losses[where]:g} losses in {trials[where]:g} trials{element}")
    args = [x if isinstance(x, jax.core.Tracer) else np.asarray(x, np.float64) for x in (num_losses, num_trials, level)]
    traced = [i for i, x in enumerate(args) if isinstance(x, jax.core.Tracer)]
    if not traced:
        return jnp.asarray(_binomial_cdf(*args))

    def host(*values):
        full = list(args)
        for i, value in zip(traced, values):
            full[i] = value
        return _binomial_cdf(*full)

    # Traced values share one shape, so vmap's leading batch axes line up with the concrete ones.
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in args))
    values = [jnp.broadcast_to(jnp.asarray(args[i], jnp.float32), shape) for i in traced]
    return jax.pure_callback(host, jax.ShapeDtypeStruct(shape, jnp.float32), *values, vmap_method="broadcast_all")


def _binomial_cdf(num_losses, num_trials, level) -> np.ndarray:
    """P(Bin(n, level) ≤ s) in float64, rounded up to float32; 1 where s ≥ n."""
    s, n, level = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (num_losses, num_trials, level)))
    below = s < n
    exact = np.where(below, scipy.special.betaincc(s + 1.0, np.where(below, n - s, 1.0), level), 1.0)
    rounded = exact.astype(np.float32)
    return np.where(rounded < exact, np.nextafter(rounded, np.float32(1.0)), rounded)


def fixed_sequence(p_values, delta) -> Array:
    """Fixed-sequence test: reject in order while p ≤ δ; the index of the last rejected
    hypothesis (strict LTT), int32 `[]`, or −1 when the first one is not rejected.

    Args:
      p_values: `[J]` p-values in testing order (most conservative first).
      delta: family-wise error level in (0, 1).
    """
    if jnp.ndim(p_values) != 1:
        raise ArgumentError(f"p_values must be a 1-D sequence [J] in testing order, got shape {jnp.shape(p_values)}")
    check_real("delta", delta, "(0, 1)")
    rejected_prefix = jnp.cumprod(jnp.asarray(p_values) <= delta)
    return (jnp.sum(rejected_prefix) - 1).astype(jnp.int32)
