"""Learn-then-Test pieces: binomial p-values and fixed-sequence testing.

Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test" [standard]. Both the LTT
baseline of CSA and ORCA's stopping-threshold calibration use these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_real

Array = jax.Array


def binomial_p_value(num_losses, num_trials, level) -> Array:
    """p = P(Bin(n, level) ≤ s): small when s losses in n trials are too few for a risk > level.

    The p-value of H: risk > level for binary losses (exact binomial tail, via the regularised
    incomplete beta function). n = 0 gives 1 (no evidence). Concrete arguments are checked;
    traced ones (inside jit) are not.

    Args:
      num_losses: s ≥ 0, number of losses (int or float array).
      num_trials: n ≥ s, same shape (broadcasts).
      level: the risk level under test, in (0, 1).
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
    s = jnp.asarray(num_losses, jnp.float32)
    n = jnp.asarray(num_trials, jnp.float32)
    below = s < n
    tail = jax.scipy.special.betainc(jnp.where(below, n - s, 1.0), s + 1.0, 1.0 - jnp.asarray(level, jnp.float32))
    return jnp.where(below, tail, 1.0)


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
